/*
 * Native loops for the two per-block hot paths (docs/performance.md, "Native loops").
 *
 * Each function does exactly what the pure-Python code next to its caller does, and the
 * tests compare the two (tests/test_native.py). The service runs without this module (the
 * build is optional: it needs a C compiler and xxhash.h, Debian's libxxhash-dev).
 *
 *   chain_keys(data, step, seed) -> list[int]
 *       Chained xxh3-64 over consecutive `step`-byte pieces of `data`, each seeded with
 *       the previous piece's digest (the first with `seed`); a trailing partial piece is
 *       ignored. Equals the loop over xxhash.xxh3_64_intdigest in TokenKeys.block_keys.
 *
 *   lookup_values(by_route, mask, keys) -> list[int]
 *       [by_route[key & mask].get(key, 0) for key in keys], as MemoryIndex.lookup reads
 *       the packed holder fields of a prompt's blocks.
 *
 *   store_fields(by_route, mask, keys, shift, tier_bit, gen_bits) -> (added, to_log)
 *       MemoryIndex's store of blocks into one slot's 8-bit field at bit `shift` of each
 *       key's packed value (see loops.py, py_store_fields, for the rules).
 *
 *   set_routed(by_route, limits, mask, keys, values) -> list[int]
 *       by_route[k & mask][k] = v for each pair; returns the routing values whose dict
 *       then holds more than its limit (repeats possible), for the caller to trim.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

static PyObject *zero;

static PyObject *
chain_keys(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t step;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "y*nK:chain_keys", &data, &step, &seed)) {
        return NULL;
    }
    if (step <= 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "step must be positive");
        return NULL;
    }
    Py_ssize_t count = data.len / step;
    PyObject *keys = PyList_New(count);
    if (keys == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const char *bytes = (const char *)data.buf;
    XXH64_hash_t key = (XXH64_hash_t)seed;
    for (Py_ssize_t i = 0; i < count; i++) {
        key = XXH3_64bits_withSeed(bytes + i * step, (size_t)step, key);
        PyObject *item = PyLong_FromUnsignedLongLong(key);
        if (item == NULL) {
            Py_DECREF(keys);
            PyBuffer_Release(&data);
            return NULL;
        }
        PyList_SET_ITEM(keys, i, item);
    }
    PyBuffer_Release(&data);
    return keys;
}

static PyObject *
lookup_values(PyObject *module, PyObject *args)
{
    PyObject *by_route, *keys_arg;
    unsigned long long mask;
    if (!PyArg_ParseTuple(args, "O!KO:lookup_values", &PyList_Type, &by_route, &mask,
                          &keys_arg)) {
        return NULL;
    }
    if (mask >= (unsigned long long)PyList_GET_SIZE(by_route)) {
        PyErr_SetString(PyExc_ValueError, "mask selects past the end of by_route");
        return NULL;
    }
    PyObject *keys = PySequence_Fast(keys_arg, "keys must be a sequence of ints");
    if (keys == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(keys);
    PyObject **items = PySequence_Fast_ITEMS(keys);
    PyObject *values = PyList_New(count);
    if (values == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = items[i];
        if (!PyLong_Check(key)) {
            PyErr_Format(PyExc_TypeError, "key %zd is not an int", i);
            goto fail;
        }
        /* A key's low bits route it; negative or wide ints route by their low bits too. */
        unsigned long long route = PyLong_AsUnsignedLongLongMask(key) & mask;
        if (route == (unsigned long long)-1 && PyErr_Occurred()) {
            goto fail;
        }
        PyObject *bucket = PyList_GET_ITEM(by_route, (Py_ssize_t)route);
        if (!PyDict_Check(bucket)) {
            PyErr_SetString(PyExc_TypeError, "by_route must hold dicts");
            goto fail;
        }
        PyObject *value = PyDict_GetItemWithError(bucket, key);
        if (value == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            value = zero;
        }
        Py_INCREF(value);
        PyList_SET_ITEM(values, i, value);
    }
    Py_DECREF(keys);
    return values;
fail:
    Py_DECREF(values);
    Py_DECREF(keys);
    return NULL;
}

/* Bits of one slot's field (service/index/memory.py). */
#define FIELD 0xFFu
#define HELD 0x01u
#define TIERS 0x0Eu
#define GEN_SHIFT 4

/* The 8-bit field at `shift` of a packed value (a non-negative int of any size). */
static int
read_field(PyObject *value, Py_ssize_t shift, PyObject *shift_obj, unsigned *field)
{
    if (shift <= 56) {
        unsigned long long low = PyLong_AsUnsignedLongLongMask(value);
        if (low == (unsigned long long)-1 && PyErr_Occurred()) {
            return -1;
        }
        *field = (unsigned)((low >> shift) & FIELD);
        return 0;
    }
    PyObject *shifted = PyNumber_Rshift(value, shift_obj);
    if (shifted == NULL) {
        return -1;
    }
    unsigned long long low = PyLong_AsUnsignedLongLongMask(shifted);
    Py_DECREF(shifted);
    if (low == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *field = (unsigned)(low & FIELD);
    return 0;
}

/* `bits << shift` as an int. */
static PyObject *
shifted_int(unsigned bits, Py_ssize_t shift, PyObject *shift_obj)
{
    if (shift <= 56) {
        return PyLong_FromUnsignedLongLong((unsigned long long)bits << shift);
    }
    PyObject *small = PyLong_FromUnsignedLong(bits);
    if (small == NULL) {
        return NULL;
    }
    PyObject *result = PyNumber_Lshift(small, shift_obj);
    Py_DECREF(small);
    return result;
}

static PyObject *
bucket_of(PyObject *by_route, unsigned long long mask, PyObject *key)
{
    if (!PyLong_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "keys must be ints");
        return NULL;
    }
    unsigned long long route = PyLong_AsUnsignedLongLongMask(key) & mask;
    if (route == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *bucket = PyList_GET_ITEM(by_route, (Py_ssize_t)route);
    if (!PyDict_Check(bucket)) {
        PyErr_SetString(PyExc_TypeError, "by_route must hold dicts");
        return NULL;
    }
    return bucket;
}

static PyObject *
store_fields(PyObject *module, PyObject *args)
{
    PyObject *by_route, *keys_arg;
    unsigned long long mask;
    Py_ssize_t shift;
    unsigned int tier_bit, gen_bits;
    if (!PyArg_ParseTuple(args, "O!KOnII:store_fields", &PyList_Type, &by_route, &mask,
                          &keys_arg, &shift, &tier_bit, &gen_bits)) {
        return NULL;
    }
    if (mask >= (unsigned long long)PyList_GET_SIZE(by_route)) {
        PyErr_SetString(PyExc_ValueError, "mask selects past the end of by_route");
        return NULL;
    }
    if (shift < 0 || (tier_bit & ~TIERS) || (gen_bits & ~(FIELD ^ (HELD | TIERS)))) {
        PyErr_SetString(PyExc_ValueError, "bad shift, tier bit or generation bits");
        return NULL;
    }
    PyObject *keys = PySequence_Fast(keys_arg, "keys must be a sequence of ints");
    if (keys == NULL) {
        return NULL;
    }
    PyObject *shift_obj = PyLong_FromSsize_t(shift);
    PyObject *fresh = shifted_int(HELD | tier_bit | gen_bits, shift, shift_obj);
    PyObject *to_log = PyList_New(0);
    Py_ssize_t added = 0;
    if (shift_obj == NULL || fresh == NULL || to_log == NULL) {
        goto fail;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(keys);
    PyObject **items = PySequence_Fast_ITEMS(keys);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = items[i];
        PyObject *bucket = bucket_of(by_route, mask, key);
        if (bucket == NULL) {
            goto fail;
        }
        PyObject *value = PyDict_GetItemWithError(bucket, key);
        if (value == NULL && PyErr_Occurred()) {
            goto fail;
        }
        unsigned old = 0;
        if (value != NULL && read_field(value, shift, shift_obj, &old) < 0) {
            goto fail;
        }
        PyObject *updated;
        int log_it;
        if (!(old & HELD)) {
            updated = value == NULL ? Py_NewRef(fresh) : PyNumber_Or(value, fresh);
            added++;
            log_it = 1;
        }
        else {
            unsigned new = (old & TIERS) | tier_bit | HELD | gen_bits;
            if (new == old) {
                continue;
            }
            PyObject *delta = shifted_int(old ^ new, shift, shift_obj);
            if (delta == NULL) {
                goto fail;
            }
            updated = PyNumber_Xor(value, delta);
            Py_DECREF(delta);
            log_it = ((old ^ new) >> GEN_SHIFT) != 0;
        }
        if (updated == NULL) {
            goto fail;
        }
        int failed = PyDict_SetItem(bucket, key, updated);
        Py_DECREF(updated);
        if (failed < 0 || (log_it && PyList_Append(to_log, key) < 0)) {
            goto fail;
        }
    }
    Py_DECREF(keys);
    Py_DECREF(shift_obj);
    Py_DECREF(fresh);
    PyObject *result = Py_BuildValue("(nN)", added, to_log);
    return result;
fail:
    Py_DECREF(keys);
    Py_XDECREF(shift_obj);
    Py_XDECREF(fresh);
    Py_XDECREF(to_log);
    return NULL;
}

static PyObject *
set_routed(PyObject *module, PyObject *args)
{
    PyObject *by_route, *limits, *keys_arg, *values_arg;
    unsigned long long mask;
    if (!PyArg_ParseTuple(args, "O!O!KOO:set_routed", &PyList_Type, &by_route, &PyList_Type,
                          &limits, &mask, &keys_arg, &values_arg)) {
        return NULL;
    }
    if (mask >= (unsigned long long)PyList_GET_SIZE(by_route) ||
        mask >= (unsigned long long)PyList_GET_SIZE(limits)) {
        PyErr_SetString(PyExc_ValueError, "mask selects past the end of by_route or limits");
        return NULL;
    }
    PyObject *keys = PySequence_Fast(keys_arg, "keys must be a sequence of ints");
    if (keys == NULL) {
        return NULL;
    }
    PyObject *values = PySequence_Fast(values_arg, "values must be a sequence");
    if (values == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    PyObject *over = PyList_New(0);
    if (over == NULL) {
        goto fail;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(keys);
    if (PySequence_Fast_GET_SIZE(values) != count) {
        PyErr_SetString(PyExc_ValueError, "keys and values differ in length");
        goto fail;
    }
    PyObject **key_items = PySequence_Fast_ITEMS(keys);
    PyObject **value_items = PySequence_Fast_ITEMS(values);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = key_items[i];
        PyObject *bucket = bucket_of(by_route, mask, key);
        if (bucket == NULL || PyDict_SetItem(bucket, key, value_items[i]) < 0) {
            goto fail;
        }
        Py_ssize_t route = (Py_ssize_t)(PyLong_AsUnsignedLongLongMask(key) & mask);
        Py_ssize_t limit = PyLong_AsSsize_t(PyList_GET_ITEM(limits, route));
        if (limit == -1 && PyErr_Occurred()) {
            goto fail;
        }
        if (PyDict_GET_SIZE(bucket) > limit) {
            PyObject *route_obj = PyLong_FromSsize_t(route);
            if (route_obj == NULL) {
                goto fail;
            }
            int failed = PyList_Append(over, route_obj);
            Py_DECREF(route_obj);
            if (failed < 0) {
                goto fail;
            }
        }
    }
    Py_DECREF(keys);
    Py_DECREF(values);
    return over;
fail:
    Py_DECREF(keys);
    Py_DECREF(values);
    Py_XDECREF(over);
    return NULL;
}

static PyMethodDef methods[] = {
    {"chain_keys", chain_keys, METH_VARARGS,
     "chain_keys(data, step, seed) -> list[int]: chained xxh3-64 over step-byte pieces."},
    {"lookup_values", lookup_values, METH_VARARGS,
     "lookup_values(by_route, mask, keys) -> list[int]: by_route[k & mask].get(k, 0)."},
    {"store_fields", store_fields, METH_VARARGS,
     "store_fields(by_route, mask, keys, shift, tier_bit, gen_bits) -> (added, to_log)."},
    {"set_routed", set_routed, METH_VARARGS,
     "set_routed(by_route, limits, mask, keys, values) -> list[int]: routes over limit."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_native", "Native loops for block keys and index lookups.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    zero = PyLong_FromLong(0);
    if (zero == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
