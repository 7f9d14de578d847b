/*
 * Python typemaps of libmoe's SWIG interface (included by ../moe.i under SWIGPYTHON).
 *
 * The low-level module (libmoe.capi) mirrors moe.h one to one; the pure-Python package libmoe
 * builds the checked, numpy/torch-facing API on top of it. Here:
 *   - a moe_status other than MOE_OK raises the libmoe.errors class of that status (a subclass of
 *     libmoe.MoeError; INVALID_ARGUMENT is also a ValueError, OUT_OF_MEMORY a MemoryError, ...),
 *     carrying .status (the name), .code and .message (moe_last_error()); MOE_OK returns None, so
 *     functions with out-parameters return just those;
 *   - tensor arguments are addresses: a Python int (numpy's arr.ctypes.data, torch's
 *     t.data_ptr()) or None for NULL. No copy is ever made here; the caller keeps the memory
 *     alive and correctly sized (libmoe.Layer checks shapes and dtypes before it passes them);
 *   - moe_layer ** / moe_context ** / void ** / moe_dtype * / int64_t *count out-parameters are returned,
 *     and moe_config_get returns the text as a str;
 *   - the GIL is released around every call (swig -threads), and re-taken before any exception
 *     is raised; moe_last_error() is per OS thread, which the GIL release does not change.
 */

%{
/* Raise the libmoe.errors exception of status s with the calling thread's moe_last_error(). */
static void moe_python_raise(moe_status s) {
  const char *name = moe_status_name(s);
  const char *text = moe_last_error();
  PyObject *message = PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
  PyObject *module = message ? PyImport_ImportModule("libmoe.errors") : NULL;
  PyObject *exc = NULL;
  if (module) {
    exc = PyObject_CallMethod(module, "from_status", "isO", (int)s, name, message);
    Py_DECREF(module);
  }
  if (exc) {
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
  } else {
    /* libmoe.errors unavailable (the module used on its own): a plain RuntimeError. */
    PyErr_Clear();
    PyErr_Format(PyExc_RuntimeError, "%s: %s", name, text);
  }
  Py_XDECREF(message);
}

/* An address argument: an int (anything with __index__) >= 0, or None for NULL. */
static int moe_python_address(PyObject *o, void **out, const char *argname) {
  if (o == Py_None) {
    *out = NULL;
    return 1;
  }
  if (!PyIndex_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s must be a memory address (int) or None, not %.200s", argname,
                 Py_TYPE(o)->tp_name);
    return 0;
  }
  PyObject *i = PyNumber_Index(o);
  if (!i) return 0;
  unsigned long long v = PyLong_AsUnsignedLongLong(i);
  Py_DECREF(i);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "%s is not a valid memory address (must be 0 <= address < 2**64)", argname);
    return 0;
  }
  *out = (void *)(uintptr_t)v;
  return 1;
}

static PyObject *moe_python_from_address(void *p) {
  if (!p) Py_RETURN_NONE;
  return PyLong_FromVoidPtr(p);
}
%}

/* ---- status -> exception ------------------------------------------------------------------- */
%typemap(out) moe_status {
  if ($1 != MOE_OK) {
    moe_python_raise($1);
    SWIG_fail;
  }
  $result = SWIG_Py_Void();
}

/* The one fallible function that does not return a moe_status. */
%exception moe_layer_num_params {
  $action
  if (result < 0) {
    moe_python_raise(MOE_ERR_INVALID_ARGUMENT);
    SWIG_fail;
  }
}

/* ---- tensors and host arrays: raw addresses --------------------------------------------------- */
%typemap(in) const void *x, void *y, const void *dy, void *dx, void *cuda_stream,
             const float *host, float *host, int64_t *counts, int32_t *expert_ids, float *weights,
             int32_t *token, int32_t *expert, float *weight {
  void *addr_ = NULL;
  if (!moe_python_address($input, &addr_, "$1_name")) SWIG_fail;
  $1 = ($1_ltype)addr_;
}
%typemap(typecheck, precedence=SWIG_TYPECHECK_POINTER)
             const void *x, void *y, const void *dy, void *dx, void *cuda_stream,
             const float *host, float *host, int64_t *counts, int32_t *expert_ids, float *weights,
             int32_t *token, int32_t *expert, float *weight {
  $1 = ($input == Py_None || PyIndex_Check($input)) ? 1 : 0;
}

/* ---- out-parameters become return values ------------------------------------------------------ */
%typemap(in, numinputs=0) moe_layer **out (moe_layer *tmp = NULL) { $1 = &tmp; }
%typemap(argout) moe_layer **out {
  $result = SWIG_Python_AppendOutput($result, SWIG_NewPointerObj(SWIG_as_voidptr(tmp$argnum), $descriptor(moe_layer *), 0));
}
%typemap(in, numinputs=0) moe_context **out (moe_context *tmp = NULL) { $1 = &tmp; }
%typemap(argout) moe_context **out {
  $result = SWIG_Python_AppendOutput($result, SWIG_NewPointerObj(SWIG_as_voidptr(tmp$argnum), $descriptor(moe_context *), 0));
}
/* moe_layer_param_buffers: returns (data, grad) addresses; grad is None for router.bias. */
%typemap(in, numinputs=0) void **data (void *tmp = NULL), void **grad (void *tmp = NULL) { $1 = &tmp; }
%typemap(argout) void **data, void **grad {
  $result = SWIG_Python_AppendOutput($result, moe_python_from_address(tmp$argnum));
}
/* moe_layer_param_dtype: returns the MOE_DTYPE_* value as an int. */
%typemap(in, numinputs=0) moe_dtype *out (moe_dtype tmp = MOE_DTYPE_F32) { $1 = &tmp; }
%typemap(argout) moe_dtype *out {
  $result = SWIG_Python_AppendOutput($result, PyLong_FromLong((long)tmp$argnum));
}
/* moe_context_assignments: returns the count. */
%typemap(in, numinputs=0) int64_t *count (int64_t tmp = 0) { $1 = &tmp; }
%typemap(argout) int64_t *count {
  $result = SWIG_Python_AppendOutput($result, PyLong_FromLongLong((long long)tmp$argnum));
}

/* ---- expert parallelism: a moe_comm made in Python ------------------------------------------- */
/* libmoe.distributed builds a moe_comm (hooks over a torch.distributed process group) with ctypes
   and hands its address here. Borrowed, as cfg->comm is: the comm must outlive every layer made
   from this config (libmoe.distributed's Layer keeps it alive with the layer's handle). */
%extend moe_config {
  void set_comm_address(unsigned long long address) { $self->comm = (const moe_comm *)(uintptr_t)address; }
}

/* moe_config_get: returns the value's text as a str. */
%typemap(in, numinputs=0) (char *buf, size_t size) (char tmp[MOE_CONFIG_VALUE_MAX]) {
  tmp[0] = 0;
  $1 = tmp;
  $2 = sizeof tmp;
}
%typemap(argout) (char *buf, size_t size) {
  $result = SWIG_Python_AppendOutput($result, PyUnicode_DecodeUTF8($1, (Py_ssize_t)strlen($1), "replace"));
}
