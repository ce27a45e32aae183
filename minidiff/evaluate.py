"""`python -m minidiff.evaluate`: the command line lives in `minidiff.eval.evaluation`; this entry point keeps the short name."""
from minidiff.eval.evaluation import main

if __name__ == "__main__":
    main()
