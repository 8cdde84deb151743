"""The command line: the argument parser and ``main()`` (``main``), one module per command
(``commands``) and the verified ``setvcpus`` flow (``resize``).

``main()`` is the only place that turns exceptions into exit statuses. Imports: every other
package of virthotplug.
"""
