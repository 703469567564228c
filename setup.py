"""Build the one C extension, fwd._fastcopy, from its Cython source."""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("fwd._fastcopy", ["fwd/_fastcopy.pyx"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
