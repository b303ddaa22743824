"""Built-in merge-method plugins: one module per method, or per family of methods sharing one pipeline."""

LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # the paper's sweep: 0.0, 0.1, ..., 1.0
