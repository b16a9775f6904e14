"""S4 behaviour-consistency reinforcement (SPEC S4): the parts of the ``consistency`` stage.

* :mod:`.challenge`: six kinds of challenge inputs made from prompts, deterministic per seed, keeping the
  protected spans (digits, names, amounts) of the source prompt (S4.1);
* :mod:`.checks`: three independent checks on (request, teacher answer, student answer): semantic
  equivalence, logical consistency, interaction quality (S4.2), each with its precision / recall on the
  labelled set in ``data/labelled.jsonl`` (:mod:`.labelled`);
* :mod:`.pool`: the hard-sample pool (S4.3): failures enter with their failing checks, train at 3x weight,
  leave after passing N iterations.

The stage itself is :mod:`distillgate.stages.consistency`. Nothing here imports the loop.
"""
