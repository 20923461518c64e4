"""Calibration from a run you already have: read another system's per-step log (`logs`), fit the costs the log
identifies and say which it does not (`fit`), and write them as a measured profile (`stalecast calibrate`, `cli`).
`studies.whatif` turns a calibration into the async plan. docs/calibrate.md explains the model and the metric names
per system with the files they come from."""
