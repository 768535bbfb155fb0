"""The DiT profiling suite: the user's entry points (single_experiment.py, run_all_experiments.sh,
visualize_memory_breakdown.py, inspect_dit_model.py, and train_dp.py, kept for its old module path); the work is in
``suite/`` (measuring) and ``plots/`` (charts and the summary, never torch)."""
