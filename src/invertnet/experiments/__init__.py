r"""Paper-figure studies built on the library only: invertibility and stability (thesis ch. 3, 4, 6), the
independence cross-entropy (thesis Fig. 6.5), latent recovery from partial measurements (Ma, Ayaz & Karaman
2018), IsotopeNet's receptive field (thesis Fig. 7.3) and the i-ResNet demo."""
