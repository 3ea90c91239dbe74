"""Benchmarks (not part of the installed package): end-to-end scripts here, kernel ones in
`kernels/`, results in `results/`, their history in NOTES.md. Run from the repo root, as
`python benchmarks/<script>.py` or `python -m benchmarks.<script>`; tests import them as
`benchmarks.<script>`."""
