"""Jupyter widgets (ipywidgets) across replicas.

A widget travels as its model id, the state the front-end sees, its comm
and the callbacks user code attached to it (``observe``, ``on_click``,
``on_msg``...). Where a widget of that id already exists (the replica whose
Python holds its comm, so the front-end's messages reach it, and any replica
that got an earlier copy) the state is set on that widget in place, without
notifying its observers or the front-end, because the replica that made the
change already did both; so the name keeps referring to the widget the
front-end talks to, and a change fires the observers once, where it is made.
Elsewhere a copy is built and registered under that id.

Nothing here imports ipywidgets: only a process that already has it can hold
a widget.
"""

import sys
import warnings

# Widgets built by _shell whose state is still to come.
_NEW = set()
# Where a widget's state carries its callbacks (never a trait's name).
_CALLBACKS = "_notebookos_callbacks"


def reduce(obj, picklable):
    """The pickle reduction of a widget with an open comm, else None.
    ``picklable(callback)`` says whether a callback can travel; one that
    cannot stays behind rather than making the whole widget unpicklable."""
    ipywidgets = sys.modules.get("ipywidgets")
    if ipywidgets is None or not isinstance(obj, ipywidgets.Widget):
        return None
    model_id = getattr(obj.comm, "comm_id", None)
    if model_id is None:  # closed: an ordinary object
        return None
    state = obj.__getstate__()
    # The state the front-end sees, and the comm. Private traits such as the
    # lock ipywidgets holds while applying a front-end's update exist or not
    # depending on what this process did, so equal widgets would differ.
    synced = set(obj.keys) | {"comm"}
    state["_trait_values"] = {k: v for k, v in state["_trait_values"].items() if k in synced}
    from ipywidgets.widgets.widget import CallbackDispatcher

    # Callback lists (on_click's, on_msg's) travel apart, callback by callback.
    for name in [k for k, v in state.items() if isinstance(v, CallbackDispatcher)]:
        del state[name]
    state[_CALLBACKS] = _callbacks(obj, picklable)
    return (_shell, (type(obj), model_id), state, None, None, _set_state)


def _callbacks(obj, picklable):
    from traitlets.traitlets import EventHandler
    from ipywidgets.widgets.widget import CallbackDispatcher

    # A class's own handlers (EventHandler) are made again by __setstate__.
    observers = {}
    for name, by_type in obj._trait_notifiers.items():
        for kind, handlers in by_type.items():
            mine = [h for h in handlers if not isinstance(h, EventHandler) and picklable(h)]
            if mine:
                observers.setdefault(name, {})[kind] = mine
    # Dispatchers are traits (on_msg's) or plain attributes (on_click's).
    dispatchers = {
        name: [c for c in value.callbacks if picklable(c)]
        for name, value in [*obj._trait_values.items(), *vars(obj).items()]
        if isinstance(value, CallbackDispatcher)
    }
    return {"observers": observers, "dispatchers": dispatchers}


def _registry():
    from ipywidgets.widgets import widget

    registry = getattr(widget, "_instances", None)  # ipywidgets 8
    return registry if registry is not None else widget.Widget.widgets


def _shell(cls, model_id):
    live = _registry().get(model_id)
    if live is not None and type(live) is cls:
        return live
    obj = cls.__new__(cls)
    _NEW.add(id(obj))
    return obj


def _set_state(obj, state):
    callbacks = state.pop(_CALLBACKS, None)
    if id(obj) in _NEW:
        _NEW.discard(id(obj))
        with warnings.catch_warnings():
            # traitlets' __setstate__ reads every class attribute, ipywidgets'
            # deprecated ones included.
            warnings.simplefilter("ignore", DeprecationWarning)
            obj.__setstate__(state)
        _registry()[obj.comm.comm_id] = obj
        if getattr(obj.comm, "_msg_callback", True) is None:
            obj.comm.on_msg(obj._handle_msg)
    else:
        # Straight into the trait values: a notification would run the
        # widget's observers a second time and echo the change to the front-end.
        values = state.get("_trait_values", {})
        for name in obj.keys:
            if name in values and name != "comm":
                obj._trait_values[name] = values[name]
    if callbacks is not None:
        _set_callbacks(obj, callbacks)


def _set_callbacks(obj, callbacks):
    from traitlets.traitlets import EventHandler

    for by_type in obj._trait_notifiers.values():
        for kind, handlers in by_type.items():
            by_type[kind] = [h for h in handlers if isinstance(h, EventHandler)]
    for name, by_type in callbacks["observers"].items():
        for kind, handlers in by_type.items():
            obj._trait_notifiers.setdefault(name, {}).setdefault(kind, []).extend(handlers)
    from ipywidgets.widgets.widget import CallbackDispatcher

    for name, wanted in callbacks["dispatchers"].items():
        dispatcher = getattr(obj, name, None)
        if not isinstance(dispatcher, CallbackDispatcher):
            dispatcher = CallbackDispatcher()
            setattr(obj, name, dispatcher)
        dispatcher.callbacks[:] = wanted
