"""Fragment files in the run directory: staged while pieces arrive, verified, then published.

quorum/fragment_KK.partial/  receiving: weights.safetensors pre-allocated at its final size
                             (header written up front) plus fragment 0's side files
quorum/fragment_KK/          promoted by one atomic directory rename once every item's bytes,
                             read back from disk, match the plan digests
"""

from __future__ import annotations

from blake3 import blake3

from protocol.messages import want_ranges
from protocol.plan import WEIGHTS_FILE, Fragment, Plan
from sandbox import PartialFile, Sandbox
from sandbox.layout import QUARANTINE, QUORUM, committed_dir, quarantine_dir, staging_dir

READ_CHUNK = 8 * 1024 * 1024


class FragmentStore:
    def __init__(self, box: Sandbox, plan: Plan) -> None:
        self.box = box
        self.plan = plan
        self._open: dict[int, dict[str, PartialFile]] = {}
        # Items read back and matched while the rest of their fragment streamed (verify_item):
        # the fragment's verification then reads only what is left. Regions of items are
        # disjoint and a piece is written once, so a matched item stays matched.
        self._matched: dict[int, set[int]] = {}
        box.mkdir(QUORUM)

    def _files(self, index: int) -> dict[str, PartialFile]:
        files = self._open.get(index)
        if files is None:
            files = self._open[index] = self._stage(self.plan.fragments[index])
        return files

    def _stage(self, fragment: Fragment) -> dict[str, PartialFile]:
        base = staging_dir(fragment.index)
        self.box.mkdir(base)
        header, _, size = fragment.layout
        files: dict[str, PartialFile] = {}
        if any(item.kind == "tensor" for item in fragment.items):
            weights = self.box.create_file(f"{base}/{WEIGHTS_FILE}", size, exist_ok=True)
            weights.write_at(0, header)  # deterministic from the plan, so rewriting on resume is harmless
            files[WEIGHTS_FILE] = weights
        for item in fragment.items:
            if item.kind == "file":
                files[item.name] = self.box.create_file(f"{base}/{item.name}", item.nbytes, exist_ok=True)
        return files

    def write(self, index: int, item: int, piece: int, payload: memoryview) -> None:
        fragment = self.plan.fragments[index]
        name, base = fragment.destination(item)
        start, _ = fragment.items[item].piece_span(piece, self.plan.piece_size)
        self._files(index)[name].write_at(base + start, payload)

    def verify_item(self, index: int, item_index: int) -> bool:
        """Read one item whose pieces are all written back from the file and hash it."""
        fragment = self.plan.fragments[index]
        name, base = fragment.destination(item_index)
        item = fragment.items[item_index]
        ok = _hash_region(self._files(index)[name], base, item.nbytes) == item.digest
        if ok:
            self._matched.setdefault(index, set()).add(item_index)
        return ok

    def verify(self, index: int) -> list[int]:
        """fsync, read every item not yet matched back from disk and hash it; returns the items
        that do not match."""
        fragment = self.plan.fragments[index]
        files = self._files(index)
        for handle in files.values():
            handle.fsync()
        bad = []
        header = fragment.layout[0]
        if WEIGHTS_FILE in files and files[WEIGHTS_FILE].read_at(0, len(header)) != header:
            files[WEIGHTS_FILE].write_at(0, header)  # the header is ours, not an agent's: just restore it
            files[WEIGHTS_FILE].fsync()
        matched = self._matched.get(index, set())
        for item_index, item in enumerate(fragment.items):
            if item_index in matched:
                continue
            name, base = fragment.destination(item_index)
            if _hash_region(files[name], base, item.nbytes) != item.digest:
                bad.append(item_index)
        return bad

    def promote(self, index: int) -> str:
        self._matched.pop(index, None)
        for handle in self._open.pop(index, {}).values():
            handle.close()
        self.box.promote(staging_dir(index), committed_dir(index))
        return committed_dir(index)

    def quarantine(self, index: int) -> str:
        """Move a promoted fragment that failed re-verification out of the quorum (one rename)."""
        self.box.mkdir(QUARANTINE)
        attempt = 1
        while self.box.exists(quarantine_dir(index, attempt)):
            attempt += 1
        self.box.promote(committed_dir(index), quarantine_dir(index, attempt))
        return quarantine_dir(index, attempt)

    def is_committed(self, index: int) -> bool:
        return self.box.exists(committed_dir(index))

    def received_pieces(self, index: int) -> dict[str, list[list[int]]]:
        """Pieces of a staged fragment whose bytes on disk match the plan (resume after a crash)."""
        if not self.box.exists(staging_dir(index)):
            return {}
        fragment = self.plan.fragments[index]
        files = self._files(index)
        out: dict[str, list[list[int]]] = {}
        for item_index, item in enumerate(fragment.items):
            name, base = fragment.destination(item_index)
            good = []
            for piece, expected in enumerate(item.pieces):
                start, length = item.piece_span(piece, self.plan.piece_size)
                if blake3(files[name].read_at(base + start, length)).hexdigest() == expected:
                    good.append(piece)
            if good:
                out[str(item_index)] = want_ranges(good)
        return out

    def verify_committed(self, index: int) -> list[int]:
        """Re-hash a promoted fragment against the plan: promoted data must never silently change."""
        fragment = self.plan.fragments[index]
        bad = []
        for item_index, item in enumerate(fragment.items):
            name, base = fragment.destination(item_index)
            with self.box.open_read(f"{committed_dir(index)}/{name}") as handle:
                if _hash_region(handle, base, item.nbytes) != item.digest:
                    bad.append(item_index)
        return bad

    def close(self) -> None:
        for files in self._open.values():
            for handle in files.values():
                handle.close()
        self._open.clear()


def _hash_region(handle: PartialFile, offset: int, nbytes: int) -> str:
    digest = blake3()
    done = 0
    while done < nbytes:
        length = min(READ_CHUNK, nbytes - done)
        digest.update(handle.read_at(offset + done, length))
        done += length
    return digest.hexdigest()
