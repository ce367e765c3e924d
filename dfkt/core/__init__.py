"""The shared core: data reconstruction + knowledge transfer, written once for both branches."""
