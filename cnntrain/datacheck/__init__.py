"""Checking a dataset before training on it: ``cnntrain check-data`` and train's leakage warning.

- ``hashing.py``   content hashes (BLAKE2b) and perceptual hashes (imagehash), cached per file
- ``findings.py``  the typed results: counts, sizes, unreadable files, duplicates, leaks, conflicts;
                   ``check_data(splits)`` and ``leak_line(splits)``
- ``report.py``    tables for a terminal, JSON for scripts, the class-count bar chart

This file imports nothing, so the CLI reads the default threshold for its help without loading
torch. Only ``report.py`` draws (matplotlib, imported when a chart is drawn) and only the
perceptual hashes need the ``check`` extra (imagehash, imported when pictures are hashed).
"""

#: Largest distance, in bits of 128 (pHash + dHash), at which two images (of like colours) count as
#: near-duplicates. On 10,000 generated photo-like JPEGs with 500 planted copies it found every byte
#: copy, half-size, JPEG-quality-50 and 2%-cropped copy and 80% of those cropped 5% on one side
#: (recall 0.96) and no unplanted pair of the 50 million; the first unplanted pair lay at 23 bits
#: (21 in the built-in shapes). A missed leak inflates a score unseen; a false pair costs a glance.
NEAR_THRESHOLD = 20
