/*
 * The training thread's fast path of `Run.log_metrics`, and the row groups it appends to.
 *
 * `_buffer.py` holds the same buffer in Python and is the reference: this module only makes its
 * commonest call cheap (a plain dict of the same keys as the previous call, float or int values, an int
 * step), which in Python costs microseconds per step. Every other call, and every error, takes the
 * Python path, so behaviour and error messages stay the same.
 *
 * Concurrency: every Python-side change of a row group or of a Lane happens under the metric streamer's
 * lock. `Lane.append` changes them without taking that lock, but only after checking that nobody holds
 * it, and it runs no Python code and releases no GIL in between, so under the GIL the whole append is
 * one atomic step that no holder of the lock can observe half done.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>
#include <string.h>
#include <time.h>

/* ---- RowGroup: one key tuple's rows (step, timestamp, one value per key), in logging order ---- */

typedef struct {
    PyObject_HEAD
    PyObject *keys;      /* tuple of str, fixed */
    Py_ssize_t nkeys;
    Py_ssize_t head;     /* index of the oldest row held: take() moves it instead of moving the rows */
    Py_ssize_t rows;     /* rows held, from head on */
    Py_ssize_t capacity; /* rows allocated */
    int64_t *steps;
    int64_t *stamps;
    double *values;      /* row-major: rows x nkeys */
} RowGroupObject;

static PyTypeObject RowGroupType;

/* Make room for `need` rows; -1 with MemoryError set when it cannot. */
static int
rowgroup_reserve(RowGroupObject *g, Py_ssize_t need)
{
    if (need <= g->capacity) {
        return 0;
    }
    Py_ssize_t cap = g->capacity ? g->capacity : 64;
    while (cap < need) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    if ((size_t)cap > SIZE_MAX / sizeof(double) / (size_t)g->nkeys) {
        PyErr_NoMemory();
        return -1;
    }
    /* Each array keeps at least the old capacity when a later one fails, so `capacity` stays a bound. */
    int64_t *steps = PyMem_Realloc(g->steps, (size_t)cap * sizeof(int64_t));
    if (steps == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    g->steps = steps;
    int64_t *stamps = PyMem_Realloc(g->stamps, (size_t)cap * sizeof(int64_t));
    if (stamps == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    g->stamps = stamps;
    double *values = PyMem_Realloc(g->values, (size_t)cap * (size_t)g->nkeys * sizeof(double));
    if (values == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    g->values = values;
    g->capacity = cap;
    return 0;
}

/* Make room for one more row at index head + rows: reuse the space taken rows left at the front once it is at
 * least half the arrays (each row then moves at most once per doubling), else grow. -1 with MemoryError set. */
static int
rowgroup_room(RowGroupObject *g)
{
    Py_ssize_t end = g->head + g->rows;
    if (end < g->capacity) {
        return 0;
    }
    if (g->head > 0 && g->head >= g->capacity / 2) {
        memmove(g->steps, g->steps + g->head, (size_t)g->rows * sizeof(int64_t));
        memmove(g->stamps, g->stamps + g->head, (size_t)g->rows * sizeof(int64_t));
        memmove(g->values, g->values + g->head * g->nkeys, (size_t)(g->rows * g->nkeys) * sizeof(double));
        g->head = 0;
        return 0;
    }
    return rowgroup_reserve(g, end + 1);
}

static int
rowgroup_init(RowGroupObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"keys", NULL};
    PyObject *keys;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!:RowGroup", kwlist, &PyTuple_Type, &keys)) {
        return -1;
    }
    if (self->nkeys != 0) { /* not keys: a group the collector cleared keeps its arrays, sized for its keys */
        PyErr_SetString(PyExc_TypeError, "RowGroup is initialised once");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "a RowGroup needs at least one key");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(keys, i))) {
            PyErr_SetString(PyExc_TypeError, "RowGroup keys must be strings");
            return -1;
        }
    }
    Py_INCREF(keys);
    self->keys = keys;
    self->nkeys = n;
    return 0;
}

/* The keys may be str subclasses that refer back to the group: a cycle the collector must see. */
static int
rowgroup_traverse(RowGroupObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keys);
    return 0;
}

static int
rowgroup_clear(RowGroupObject *self)
{
    Py_CLEAR(self->keys); /* a cleared group refuses every call, as one never initialised */
    return 0;
}

static void
rowgroup_dealloc(RowGroupObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->keys);
    PyMem_Free(self->steps);
    PyMem_Free(self->stamps);
    PyMem_Free(self->values);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
rowgroup_ready(RowGroupObject *self)
{
    if (self->keys == NULL) {
        PyErr_SetString(PyExc_TypeError, "RowGroup was not initialised");
        return 0;
    }
    return 1;
}

/* append(step, stamp, values): one row; `values` a sequence of len(keys) numbers. All or nothing. */
static PyObject *
rowgroup_append(RowGroupObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!rowgroup_ready(self)) {
        return NULL;
    }
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "append(step, stamp, values) takes 3 arguments");
        return NULL;
    }
    long long step = PyLong_AsLongLong(args[0]);
    if (step == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long stamp = PyLong_AsLongLong(args[1]);
    if (stamp == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* Every value is converted before the group is touched: a value's __float__ may run Python code that
     * changes the sequence or the group (grows it, takes rows), so nothing may point into either meanwhile. */
    PyObject *seq = PySequence_Tuple(args[2]);
    if (seq == NULL) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(seq) != self->nkeys) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "a row of this group holds %zd values", self->nkeys);
        return NULL;
    }
    double small[16];
    double *converted = small;
    if (self->nkeys > 16) {
        converted = PyMem_Malloc((size_t)self->nkeys * sizeof(double));
        if (converted == NULL) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
    }
    for (Py_ssize_t i = 0; i < self->nkeys; i++) {
        double v = PyFloat_AsDouble(PyTuple_GET_ITEM(seq, i));
        if (v == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            if (converted != small) {
                PyMem_Free(converted);
            }
            return NULL;
        }
        converted[i] = v;
    }
    Py_DECREF(seq);
    /* From here to the commit no Python code runs. */
    int reserved = rowgroup_room(self);
    Py_ssize_t at = self->head + self->rows;
    if (reserved == 0) {
        memcpy(self->values + at * self->nkeys, converted, (size_t)self->nkeys * sizeof(double));
    }
    if (converted != small) {
        PyMem_Free(converted);
    }
    if (reserved < 0) {
        return NULL;
    }
    self->steps[at] = (int64_t)step;
    self->stamps[at] = (int64_t)stamp;
    self->rows++;
    Py_RETURN_NONE;
}

/* take(rows) -> (steps, stamps, values) as bytes of int64, int64 and float64 (row-major): the oldest rows. */
static PyObject *
rowgroup_take(RowGroupObject *self, PyObject *arg)
{
    if (!rowgroup_ready(self)) {
        return NULL;
    }
    Py_ssize_t want = PyLong_AsSsize_t(arg);
    if (want == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (want < 0) {
        PyErr_SetString(PyExc_ValueError, "take() needs a row count >= 0");
        return NULL;
    }
    Py_ssize_t n = want < self->rows ? want : self->rows;
    Py_ssize_t k = self->nkeys;
    Py_ssize_t h = self->head;
    PyObject *steps = PyBytes_FromStringAndSize((const char *)(self->steps + h), n * (Py_ssize_t)sizeof(int64_t));
    PyObject *stamps = PyBytes_FromStringAndSize((const char *)(self->stamps + h), n * (Py_ssize_t)sizeof(int64_t));
    PyObject *values =
        PyBytes_FromStringAndSize((const char *)(self->values + h * k), n * k * (Py_ssize_t)sizeof(double));
    PyObject *result = NULL;
    if (steps != NULL && stamps != NULL && values != NULL) {
        result = PyTuple_Pack(3, steps, stamps, values);
    }
    Py_XDECREF(steps);
    Py_XDECREF(stamps);
    Py_XDECREF(values);
    if (result == NULL) {
        return NULL; /* nothing removed */
    }
    self->rows -= n;
    self->head = self->rows ? h + n : 0; /* the rows left stay where they are (see rowgroup_room) */
    return result;
}

static PyObject *
rowgroup_get_keys(RowGroupObject *self, void *closure)
{
    if (!rowgroup_ready(self)) {
        return NULL;
    }
    Py_INCREF(self->keys);
    return self->keys;
}

static PyObject *
rowgroup_get_rows(RowGroupObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->rows);
}

static PyMethodDef rowgroup_methods[] = {
    {"append", (PyCFunction)(void (*)(void))rowgroup_append, METH_FASTCALL,
     "append(step, stamp, values): add one row (values: one number per key)."},
    {"take", (PyCFunction)rowgroup_take, METH_O,
     "take(rows) -> (steps, stamps, values): remove the oldest rows, as bytes of int64, int64, float64."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef rowgroup_getset[] = {
    {"keys", (getter)rowgroup_get_keys, NULL, "The metric keys of every row, in order.", NULL},
    {"rows", (getter)rowgroup_get_rows, NULL, "How many rows the group holds.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RowGroupType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "runledger._rowbuffer.RowGroup",
    .tp_doc = "Rows of one key tuple: steps, timestamps and values in C arrays.",
    .tp_basicsize = sizeof(RowGroupObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rowgroup_init,
    .tp_dealloc = (destructor)rowgroup_dealloc,
    .tp_traverse = (traverseproc)rowgroup_traverse,
    .tp_clear = (inquiry)rowgroup_clear,
    .tp_methods = rowgroup_methods,
    .tp_getset = rowgroup_getset,
};

/* ---- Lane: the state the fast path reads, and the fast path itself ---- */

typedef struct {
    PyObject_HEAD
    PyObject *group;  /* the newest RowGroup, which a call with its keys appends to; or None */
    PyObject *locked; /* the streamer lock's bound `locked` method (a builtin: it runs no Python code) */
    long long points; /* points buffered (all groups) */
    long long slow_at; /* at this many buffered points the Python path must run (wake the sender, wait) */
    char unusable;    /* closing or failed: every call takes the Python path, which raises */
} LaneObject;

static int
lane_init(LaneObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"lock", NULL};
    PyObject *lock;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Lane", kwlist, &lock)) {
        return -1;
    }
    if (self->locked != NULL) {
        PyErr_SetString(PyExc_TypeError, "Lane is initialised once");
        return -1;
    }
    PyObject *locked = PyObject_GetAttrString(lock, "locked");
    if (locked == NULL) {
        return -1;
    }
    if (!PyCFunction_Check(locked)) {
        /* A lock written in Python could switch threads inside the check and break its atomicity. */
        Py_DECREF(locked);
        PyErr_SetString(PyExc_TypeError, "Lane needs a threading.Lock");
        return -1;
    }
    Py_XSETREF(self->locked, locked);
    Py_INCREF(Py_None);
    Py_XSETREF(self->group, Py_None);
    self->points = 0;
    self->slow_at = 0;
    self->unusable = 0;
    return 0;
}

static int
lane_traverse(LaneObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->group);
    Py_VISIT(self->locked);
    return 0;
}

static int
lane_clear(LaneObject *self)
{
    Py_CLEAR(self->group);
    Py_CLEAR(self->locked);
    return 0;
}

static void
lane_dealloc(LaneObject *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
lane_get_group(LaneObject *self, void *closure)
{
    PyObject *group = self->group ? self->group : Py_None;
    Py_INCREF(group);
    return group;
}

static int
lane_set_group(LaneObject *self, PyObject *value, void *closure)
{
    if (value == NULL || (value != Py_None && (!PyObject_TypeCheck(value, &RowGroupType) ||
                                               ((RowGroupObject *)value)->keys == NULL))) {
        PyErr_SetString(PyExc_TypeError, "Lane.group is an initialised RowGroup or None");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->group, value);
    return 0;
}

/* Equal str objects: the same object (literal keys, the usual case), else the same code points. */
static inline int
same_key(PyObject *key, PyObject *expected)
{
    if (key == expected) {
        return 1;
    }
    if (!PyUnicode_CheckExact(key) || !PyUnicode_CheckExact(expected)) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(key) < 0 || PyUnicode_READY(expected) < 0) {
        PyErr_Clear();
        return 0;
    }
#endif
    Py_ssize_t n = PyUnicode_GET_LENGTH(key);
    int kind = PyUnicode_KIND(key);
    return n == PyUnicode_GET_LENGTH(expected) && kind == PyUnicode_KIND(expected) &&
           memcmp(PyUnicode_DATA(key), PyUnicode_DATA(expected), (size_t)n * (size_t)kind) == 0;
}

/* An exact int within int64; 0 when it is anything else (the Python path then decides). */
static inline int
exact_int64(PyObject *obj, int64_t *out)
{
    if (!PyLong_CheckExact(obj)) {
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = (int64_t)v;
    return 1;
}

/* The wall clock in ms, as time.time_ns() // 1_000_000; 0 when it cannot be read here. */
static inline int
now_ms(int64_t *out)
{
#if defined(CLOCK_REALTIME)
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        return 0;
    }
    *out = (int64_t)ts.tv_sec * 1000 + (int64_t)(ts.tv_nsec / 1000000);
    return 1;
#else
    return 0;
#endif
}

/*
 * append(metrics, step, timestamp_ms) -> bool: True when the point row was appended here; False when
 * the Python path must handle the call (nothing was changed). Never raises for bad input.
 */
static PyObject *
lane_append(LaneObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "append(metrics, step, timestamp_ms) takes 3 arguments");
        return NULL;
    }
    PyObject *metrics = args[0];
#ifdef Py_GIL_DISABLED
    /* Without a GIL nothing makes this function atomic: every call takes the Python path, under the lock. */
    Py_RETURN_FALSE;
#endif
    if (self->unusable || self->locked == NULL || self->group == NULL || self->group == Py_None ||
        !PyDict_CheckExact(metrics)) {
        Py_RETURN_FALSE;
    }
    RowGroupObject *g = (RowGroupObject *)self->group;
    Py_ssize_t k = g->nkeys;
    if (g->keys == NULL || PyDict_GET_SIZE(metrics) != k || self->points + k >= self->slow_at) {
        Py_RETURN_FALSE;
    }
    int64_t step, stamp;
    if (!exact_int64(args[1], &step)) {
        Py_RETURN_FALSE;
    }
    if (args[2] == Py_None ? !now_ms(&stamp) : !exact_int64(args[2], &stamp)) {
        Py_RETURN_FALSE;
    }
    PyObject *held = PyObject_CallNoArgs(self->locked);
    if (held == NULL) {
        return NULL;
    }
    int free_now = held == Py_False;
    Py_DECREF(held);
    if (!free_now) {
        Py_RETURN_FALSE; /* a holder of the lock is changing the buffer: wait for it the Python way */
    }
    if (rowgroup_room(g) < 0) {
        return NULL;
    }
    Py_ssize_t at = g->head + g->rows;
    double *row = g->values + at * k;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(metrics, &pos, &key, &value)) {
        if (!same_key(key, PyTuple_GET_ITEM(g->keys, i))) {
            Py_RETURN_FALSE;
        }
        if (PyFloat_CheckExact(value)) {
            row[i] = PyFloat_AS_DOUBLE(value);
        }
        else if (PyLong_CheckExact(value)) {
            double v = PyLong_AsDouble(value);
            if (v == -1.0 && PyErr_Occurred()) {
                PyErr_Clear(); /* too large for a float: the Python path names the key */
                Py_RETURN_FALSE;
            }
            row[i] = v;
        }
        else {
            Py_RETURN_FALSE; /* bool, numpy scalars, strings...: float() semantics, in Python */
        }
        i++;
    }
    g->steps[at] = step;
    g->stamps[at] = stamp;
    g->rows++;
    self->points += k;
    Py_RETURN_TRUE;
}

/*
 * commit(group, step, stamp, values): the Python path's append of one row (values already floats), and the
 * lane's newest group and count with it, in one call: an interrupt (Ctrl-C) is handled when a C call returns,
 * so between a row stored and its count it would leave the buffer holding rows it does not count.
 */
static PyObject *
lane_commit(LaneObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "commit(group, step, stamp, values) takes 4 arguments");
        return NULL;
    }
    PyObject *group = args[0];
    if (!PyObject_TypeCheck(group, &RowGroupType) || ((RowGroupObject *)group)->keys == NULL) {
        PyErr_SetString(PyExc_TypeError, "commit() needs an initialised RowGroup");
        return NULL;
    }
    PyObject *done = rowgroup_append((RowGroupObject *)group, args + 1, 3);
    if (done == NULL) {
        return NULL;
    }
    Py_DECREF(done);
    Py_INCREF(group);
    Py_XSETREF(self->group, group);
    self->points += ((RowGroupObject *)group)->nkeys;
    Py_RETURN_NONE;
}

static PyMethodDef lane_methods[] = {
    {"append", (PyCFunction)(void (*)(void))lane_append, METH_FASTCALL,
     "append(metrics, step, timestamp_ms) -> bool: the fast path of log_metrics (False: take the Python path)."},
    {"commit", (PyCFunction)(void (*)(void))lane_commit, METH_FASTCALL,
     "commit(group, step, stamp, values): append a row to group, make it the newest and count it, at once."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef lane_members[] = {
    {"points", T_LONGLONG, offsetof(LaneObject, points), 0, "Points buffered."},
    {"slow_at", T_LONGLONG, offsetof(LaneObject, slow_at), 0, "Buffered points at which Python must act."},
    {"unusable", T_BOOL, offsetof(LaneObject, unusable), 0, "Closing or failed: every call takes the Python path."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef lane_getset[] = {
    {"group", (getter)lane_get_group, (setter)lane_set_group, "The newest RowGroup, or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "runledger._rowbuffer.Lane",
    .tp_doc = "What log_metrics' fast path reads and changes; see the module's comment on concurrency.",
    .tp_basicsize = sizeof(LaneObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_members = lane_members,
    .tp_getset = lane_getset,
};

static struct PyModuleDef rowbuffer_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "runledger._rowbuffer",
    .m_doc = "The fast path of log_metrics: row groups in C (the reference is runledger._buffer).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__rowbuffer(void)
{
    if (PyType_Ready(&RowGroupType) < 0 || PyType_Ready(&LaneType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&rowbuffer_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "RowGroup", (PyObject *)&RowGroupType) < 0 ||
        PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
