"""`python -m lowbit ...` runs the `lowbit` command line."""

from lowbit.cli import main

if __name__ == "__main__":
    main(prog_name="lowbit")
