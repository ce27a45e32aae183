"""`python -m minidiff.grade`: the command line lives in `minidiff.course.grade`; this entry point keeps the short name."""
import sys

from minidiff.course.grade import main

if __name__ == "__main__":
    sys.exit(main())
