"""Backbone features: pretrained CNNs (timm), handcrafted features, patch features."""
