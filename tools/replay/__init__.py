"""trackalert-replay: run a config's policies over a recorded event log before they go live.

Installed as `trackalert.replay` from the top-level `tools/replay/` folder (DESIGN §9). The
engine (engine.py) drives the daemon's own runtime over a log (source.py) on a virtual clock and
captures what would have left the machine (capture.py); summary.py and compare.py turn that into
the outputs of the command (cli.py). docs/replay.md is the operator's guide.
"""
