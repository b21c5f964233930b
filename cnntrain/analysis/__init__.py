"""What the answers of a trained model say: which were wrong, and how far to trust its confidence.

- ``answers.py``      every image's logits, target and path from one evaluation pass
- ``mistakes.py``     the most-confused class pairs, the misclassified files, the top losses
- ``calibration.py``  ECE and reliability bins, temperature scaling, coverage at a min-confidence
- ``pictures.py``     top_losses.png and the reliability diagram (imports matplotlib: import it lazily)
- ``run_end.py``      the end of a training run: temperature into best.pt, pictures, summary.json keys

Used by ``cnntrain.train.fit`` (the pass that scores the best weights), ``cnntrain.evaluation``
(``cnntrain eval``) and ``cnntrain.predict`` (the temperature, ``--min-confidence``).
"""
