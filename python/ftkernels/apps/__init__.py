"""The applications, above the library: the ``ftk`` command (cli), the fine-tuning job
(finetune), the benchmark report (bench) and their plots (plots, matplotlib), and the bug-report
doctor (doctor, with its self-test of every op: selftest)."""
