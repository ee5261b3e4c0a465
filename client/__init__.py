"""Hospital side of fedpath: slide preparation, site-local training and the Flower ClientApp."""
