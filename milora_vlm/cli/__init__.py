"""The command-line tools, installed as console scripts (pyproject.toml [project.scripts]).

Each module's `main(argv)` is the tool; the files under data_prep/, eval/ and scripts/ are thin wrappers that
call it, so `python eval/score.py ...` and `milora-score ...` are the same program.
"""


def exit_status_zero(main):
    """The console script of a main() that returns its results (tests use them) instead of an exit status."""

    def entry(argv: list[str] | None = None) -> int:
        main(argv)
        return 0

    return entry
