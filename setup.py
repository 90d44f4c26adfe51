# setuptools needs this file for cffi_modules: the C checker in csrc/checker is
# compiled into harness._checker when the package is built or installed.
from setuptools import setup

setup(cffi_modules=["csrc/checker/ffibuild.py:ffibuilder"])
