"""Flower App of the heterogeneity lab: MobileNetV2 on CIFAR-10 with device telemetry."""
