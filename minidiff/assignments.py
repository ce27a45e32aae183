"""`python -m minidiff.assignments`: the command line lives in `minidiff.course.assignments`; this entry point keeps the short name."""
import sys

from minidiff.course.assignments import main

if __name__ == "__main__":
    sys.exit(main())
