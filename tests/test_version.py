"""One version number: the package's, the adapter files' and the distribution's agree."""

import configparser
from pathlib import Path

import ace_diffusers
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline
from ace_diffusers.version import __version__


def test_the_package_reports_the_distribution_version():
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert ace_diffusers.__version__ == __version__
    assert config["metadata"]["version"] in (__version__, "attr: ace_diffusers.version.__version__")


def test_adapters_record_the_version_that_made_them():
    adapter = random_adapter(tiny_sd_pipeline().unet)
    assert adapter.config["created_with"] == f"ace-diffusers {__version__}"
