"""The figure-led report of runs, sweeps and ablations: one self-contained HTML file.

sources reads and tells inputs apart, timeline rebuilds a run's lanes from its logs, figures
draws (matplotlib, SVG), sections says what each input shows, page lays it out, build writes it.
"""
