"""`python -m minidiff.train`: the command line lives in `minidiff.training.cli`; this entry point keeps the short name."""
from minidiff.training.cli import main

if __name__ == "__main__":
    main()
