from setuptools import setup

setup(
    cffi_modules=["layerfs/_build.py:ffibuilder"],
)
