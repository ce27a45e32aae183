"""`python -m minidiff.distill`: the command line lives in `minidiff.training.distill_cli`; the methods in
`minidiff.training.distill`. This entry point keeps the short name, like `python -m minidiff.train`."""
from minidiff.training.distill_cli import main

if __name__ == "__main__":
    main()
