"""Regenerates the protobuf/gRPC code from protos/ as part of every build."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self):
        sys.path.insert(0, str(Path(__file__).parent / "tools"))
        import genproto

        genproto.generate(genproto.OUT_ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
