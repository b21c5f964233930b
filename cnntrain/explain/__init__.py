"""Why did the model say that: Grad-CAM heatmaps over images (``cnntrain explain``).

``targets`` finds the layer to explain in any CNN, ``gradcam`` computes the maps with captum
(the optional extra ``cnntrain[explain]``), ``overlay`` lays them over the images as the model
saw them. Nothing here is imported by ``import cnntrain``; captum is imported only when a map is
computed.
"""
