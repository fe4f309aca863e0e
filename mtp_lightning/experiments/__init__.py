"""Experiment tooling on top of training and decoding: the grid sweep (``sweep``), its report with
plots (``report``), and the training-throughput benchmark (``bench_train``)."""
