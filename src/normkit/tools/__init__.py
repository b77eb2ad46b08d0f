"""normkit's user-facing tools, one per file, behind the ``normkit`` command line (:mod:`.cli`):

- :mod:`.check`: every module and backend against its oracle (``normkit check``);
- :mod:`.explain`: what each norm reduces, keeps and computes, and the tutorials' worked
  examples replayed (``normkit explain``);
- :mod:`.bench`: the benchmark engine (``normkit bench`` and the scripts under ``benchmarks/``);
- :mod:`.compare`: a small CNN trained per norm and batch size (``normkit compare``);
- :mod:`.plots`: their pictures (matplotlib, from the ``cli`` extra).

Nothing is imported here: each subcommand imports what it needs, so ``normkit --help`` starts
without torch's compiler stack or matplotlib.
"""

__all__: list[str] = []
