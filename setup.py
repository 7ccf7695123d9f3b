"""Maps the two source folders onto one import name: runtime/ -> quantrt, platforms/ -> quantrt.platforms."""

from setuptools import find_packages, setup

packages = ["quantrt"] + [f"quantrt.{p}" for p in find_packages("runtime")]
packages += ["quantrt.platforms"] + [f"quantrt.platforms.{p}" for p in find_packages("platforms")]

setup(
    packages=packages,
    package_dir={"quantrt": "runtime", "quantrt.platforms": "platforms"},
    package_data={"quantrt": ["configs/*.yaml"]},
)
