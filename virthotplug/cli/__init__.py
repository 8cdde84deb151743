"""The command line: the argument parser and ``main()`` (``main``) and one module per command
(``commands``), which only parse arguments and print; the operations they run are
``virthotplug.ops``.

``main()`` is the only place that turns exceptions into exit statuses. Imports: every other
package of virthotplug.
"""
