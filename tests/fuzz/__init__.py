"""atheris fuzz targets for the parsers and codecs; see README.md."""
