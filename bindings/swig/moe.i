/*
 * The one SWIG interface of libmoe, shared by every target language (Python, Java).
 *
 * What is shared here: the whole of include/moe/moe.h (%include, never copied), the contract that
 * every moe_status other than MOE_OK becomes an exception of the target language carrying the
 * status name and moe_last_error(), and constructors that make fresh structs valid
 * (moe_config initialised by moe_config_init, moe_stats with its struct_size set).
 *
 * What is per language (python/moe_python.i, java/moe_java.i): the exception classes and the
 * typemaps that decide how pointers cross the boundary. The shared contract every language file
 * must implement:
 *   - %typemap(out) moe_status: MOE_OK returns nothing; anything else raises (status name + text);
 *   - moe_layer ** / moe_context ** out-parameters become return values (no caller allocation);
 *   - moe_config_get's (char *buf, size_t size) gives the text back as the language's string;
 *   - tensor arguments (const void *x, void *y, const void *dy, void *dx, float *host, ...) are
 *     raw addresses, so a binding can pass the memory of its arrays/tensors with no copy.
 *
 * Module name: "moe" here; the Python build renames it with `swig -module capi` so that the
 * low-level module is libmoe.capi inside the pure-Python package libmoe.
 */
%module moe

%{
#include "moe/moe.h"
%}

%include <stdint.i>

/* MOE_API expands to a GCC attribute SWIG need not see. */
#define MOE_API

/* ---- language-specific typemaps and the status -> exception mapping --------------------------- */
#if defined(SWIGPYTHON)
%include "python/moe_python.i"
#elif defined(SWIGJAVA)
%include "java/moe_java.i"
#endif

/* ---- shared: structs whose fresh instances are already valid --------------------------------- */

/* The parameter description is read-only: its name is owned by the layer. */
%immutable moe_param_info::name;
%immutable moe_param_info::ndim;
%immutable moe_param_info::trainable;

/* moe_comm (expert parallelism) carries C function pointers; a binding that offers comm hooks
   wraps them itself, so the struct's members are not exposed here. The config's comm field is read-only
   (always NULL from a binding). */
%ignore moe_comm::exchange_counts;
%ignore moe_comm::exchange_rows;
%ignore moe_comm::last_error;
%ignore moe_comm::user;
%immutable moe_config::comm;

%extend moe_config {
  /* A new config holds the library defaults (moe_config_init), never garbage. */
  moe_config() {
    moe_config *c = (moe_config *)calloc(1, sizeof(moe_config));
    moe_config_init(c);
    return c;
  }
  ~moe_config() { free($self); }
}

%extend moe_stats {
  moe_stats() {
    moe_stats *s = (moe_stats *)calloc(1, sizeof(moe_stats));
    if (s) s->struct_size = sizeof(moe_stats);
    return s;
  }
  ~moe_stats() { free($self); }
}

%ignore moe_param_info::shape; /* a fixed array: read it through dim(i) */
%extend moe_param_info {
  moe_param_info() { return (moe_param_info *)calloc(1, sizeof(moe_param_info)); }
  ~moe_param_info() { free($self); }
  /* shape[i] for 0 <= i < ndim; 0 otherwise. */
  int64_t dim(int i) const { return (i >= 0 && i < $self->ndim && i < 3) ? $self->shape[i] : 0; }
}

/* The description of a config field is read-only, its strings static; the enum names are read
   through value_name(i). */
%immutable moe_config_field_info::name;
%immutable moe_config_field_info::type;
%immutable moe_config_field_info::offset;
%immutable moe_config_field_info::size;
%immutable moe_config_field_info::default_value;
%immutable moe_config_field_info::num_values;
%immutable moe_config_field_info::description;
%ignore moe_config_field_info::value_names;
%extend moe_config_field_info {
  moe_config_field_info() {
    moe_config_field_info *f = (moe_config_field_info *)calloc(1, sizeof(moe_config_field_info));
    if (f) f->struct_size = sizeof(moe_config_field_info);
    return f;
  }
  ~moe_config_field_info() { free($self); }
  /* value_names[i] for 0 <= i < num_values; NULL otherwise. */
  const char *value_name(int i) const {
    return ($self->value_names && i >= 0 && i < $self->num_values) ? $self->value_names[i] : NULL;
  }
}

/* The opaque handles are plain pointers: their owner (the language's Layer/Context object)
   frees them with moe_layer_destroy / moe_context_destroy. */

%include "moe/moe.h"
