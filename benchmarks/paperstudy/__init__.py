"""The code of `benchmarks/paper_study.py` (the entry point and its CLI), one module per concern:

- `settings.py`: the reward configurations, `StudySettings` and the settings a resumed study must keep;
- `checks.py`: every option and input checked before the study writes anything (ranges derived from what the
  study computes, `sarkern train`'s own option checks reused);
- `storage.py`: the work directory's files: atomic and write-once writes, the study lock, input digests;
- `ranking.py`: the ranking analysis's answer sets of known quality and its pair agreement.
"""
