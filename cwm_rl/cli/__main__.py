"""`python -m cwm_rl.cli ...` is `cwm-rl ...` (how the job starts its env servers)."""

from cwm_rl.cli import main

main()
