"""The built-in plugin: ordinary hook implementations, registered first under the name ``builtin``.

Each module here is what a third-party plugin module looks like; see ``plugins/`` for an installable one.
"""
