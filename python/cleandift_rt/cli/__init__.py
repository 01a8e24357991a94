"""The ``cleandift-rt`` command line: the parser, the command registry and the shared CLI helpers.

``main`` (in ``cli.main``) builds one parser from the commands each subpackage registers in its
own ``cli`` module, beside the code it drives (``runtime/cli.py``, ``evaluation/cli.py``, ...);
``cli.common`` holds the helpers they share (engine options, one-line user errors, picture and
JSON output), ``cli.demo`` the end-to-end demo. This is the application layer: it may import
everything, and nothing in the library imports it (this file imports nothing, so a subpackage's
``cli`` module can use ``cli.common`` without a circle).
"""
