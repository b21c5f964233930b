"""Checking a dataset before training on it: ``cnntrain check-data`` and train's leakage warning.

- ``hashing.py``   content hashes (BLAKE2b) and perceptual hashes (imagehash), cached per file
- ``findings.py``  the typed results: counts, sizes, unreadable files, duplicates, leaks, conflicts;
                   ``check_data(splits)`` and ``leak_line(splits)``
- ``report.py``    tables for a terminal, JSON for scripts, the class-count bar chart

This file imports nothing, so the CLI reads the default threshold for its help without loading
torch. Only ``report.py`` draws (matplotlib, imported when a chart is drawn) and only the
perceptual hashes need the ``check`` extra (imagehash, imported when pictures are hashed).
"""

#: Largest distance, in bits of 128 (pHash + dHash), at which two images count as near-duplicates.
#: On generated photo-like JPEGs it kept every resized, re-encoded and 2%-cropped copy (and most
#: 3% crops) while no unrelated pair of 3,000 images (4.5 million pairs) came within it.
NEAR_THRESHOLD = 20
