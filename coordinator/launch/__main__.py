from coordinator.launch.cli import entry

entry()
