"""Teachers: models saved in any common format, loaded as immutable specs with a runner.

:mod:`kdcli.teachers.base` holds the types (:class:`~kdcli.teachers.base.Teacher`, its inputs,
the format entry's interface); one module per format holds its entry (``FORMAT``);
:mod:`kdcli.teachers.formats` lists those modules and loads teachers
(:func:`~kdcli.teachers.formats.load_teacher`).
"""
