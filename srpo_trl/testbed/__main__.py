"""`python -m srpo_trl.testbed OUTPUT_DIR [--pretrained]`: save a tiny model and tokenizer for a first CPU run."""

from .tiny import main

main()
