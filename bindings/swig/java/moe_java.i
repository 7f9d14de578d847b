/*
 * Java typemaps of libmoe's SWIG interface (included by ../moe.i under SWIGJAVA).
 *
 * The low-level classes (package org.libmoe.jni: MoeNative, MoeNativeJNI, moe_config, moe_stats,
 * moe_param_info) mirror moe.h one to one; the hand-written package org.libmoe (Layer, Context,
 * Config, MoeException, ...) builds the checked API on top of them. Here:
 *   - a moe_status other than MOE_OK throws org.libmoe.MoeException carrying the status code,
 *     its name and moe_last_error() (read on the calling thread inside the same JNI call);
 *     functions that return a moe_status return void in Java;
 *   - handles (moe_layer *, moe_context *) and tensor/host-array arguments are raw addresses
 *     (long): org.libmoe passes the address of a direct buffer (MoeNative.moe_java_buffer_address)
 *     plus its position, so no copy is made here; 0 is NULL;
 *   - out-parameters (moe_layer **, moe_context **, void **data/grad, int64_t *count) are long[]
 *     (moe_dtype *out is an int[]; moe_config_get's text buffer a byte[])
 *     of at least one element that receive the value;
 *   - uint64_t (the seed) is a Java long holding the same 64 bits;
 *   - enums are int constants (org.libmoe has the Java enums);
 *   - the struct proxies have no finalizer: they are AutoCloseable and freed by close().
 */

%include "enumtypeunsafe.swg"
%javaconst(1);

/* The JNI class loads the native library itself (from the jar, or java.library.path). */
%pragma(java) jniclasscode=%{
  static {
    org.libmoe.NativeLoader.load();
  }
%}

%{
#include <stdint.h>
#include <string.h>

/* Throw org.libmoe.MoeException(code, name, messageUtf8) for status s with the text given. The
   message goes as UTF-8 bytes (NewStringUTF expects modified UTF-8). */
static void moe_java_throw_text(JNIEnv *jenv, moe_status s, const char *text) {
  const char *name = moe_status_name(s);
  jclass cls;
  jmethodID ctor;
  jstring jname;
  jbyteArray jtext;
  jobject exc;
  jsize n;
  if ((*jenv)->ExceptionCheck(jenv)) return;
  n = (jsize)strlen(text);
  cls = (*jenv)->FindClass(jenv, "org/libmoe/MoeException");
  if (cls == NULL) return; /* NoClassDefFoundError pending */
  ctor = (*jenv)->GetMethodID(jenv, cls, "<init>", "(ILjava/lang/String;[B)V");
  if (ctor == NULL) return;
  jname = (*jenv)->NewStringUTF(jenv, name);
  jtext = (*jenv)->NewByteArray(jenv, n);
  if (jname == NULL || jtext == NULL) return; /* OutOfMemoryError pending */
  (*jenv)->SetByteArrayRegion(jenv, jtext, 0, n, (const jbyte *)text);
  exc = (*jenv)->NewObject(jenv, cls, ctor, (jint)s, jname, jtext);
  if (exc != NULL) (*jenv)->Throw(jenv, (jthrowable)exc);
}

/* The same with this thread's moe_last_error(). */
static void moe_java_throw(JNIEnv *jenv, moe_status s) { moe_java_throw_text(jenv, s, moe_last_error()); }

/* Fetch the one-element long[] of an out-parameter; throws and returns 0 when it is unusable. */
static int moe_java_out_array(JNIEnv *jenv, jlongArray a, const char *argname) {
  if (a == NULL || (*jenv)->GetArrayLength(jenv, a) < 1) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a long[] of at least one element", argname);
    SWIG_JavaThrowException(jenv, SWIG_JavaIllegalArgumentException, msg);
    return 0;
  }
  return 1;
}
%}

/* ---- status -> exception ----------------------------------------------------------------------- */
%typemap(jni) moe_status "void"
%typemap(jtype) moe_status "void"
%typemap(jstype) moe_status "void"
%typemap(javaout) moe_status { $jnicall; }
%typemap(out) moe_status {
  if ($1 != MOE_OK) {
    moe_java_throw(jenv, $1);
    return $null;
  }
}
/* The status constants would take the type above (void): org.libmoe.Status replaces them. */
%ignore MOE_OK;
%ignore MOE_ERR_INVALID_ARGUMENT;
%ignore MOE_ERR_OUT_OF_MEMORY;
%ignore MOE_ERR_UNSUPPORTED;
%ignore MOE_ERR_DEVICE;
%ignore MOE_ERR_COMM;
%ignore MOE_ERR_STATE;
%ignore MOE_ERR_NONFINITE;
%ignore MOE_ERR_INTERNAL;

/* moe_status_name takes a status value: keep it an int there. */
%typemap(jni) moe_status s "jint"
%typemap(jtype) moe_status s "int"
%typemap(jstype) moe_status s "int"
%typemap(javain) moe_status s "$javainput"
%typemap(in) moe_status s %{ $1 = (moe_status)$input; %}

/* The one fallible function that does not return a moe_status. */
%exception moe_layer_num_params {
  $action
  if (result < 0) {
    moe_java_throw(jenv, MOE_ERR_INVALID_ARGUMENT);
    return $null;
  }
}

/* ---- uint64_t: the 64 bits in a long -------------------------------------------------------- */
%apply int64_t { uint64_t };

/* ---- handles and tensors: raw addresses ------------------------------------------------------ */
%define MOE_JAVA_ADDRESS(TYPES...)
%typemap(jni) TYPES "jlong"
%typemap(jtype) TYPES "long"
%typemap(jstype) TYPES "long"
%typemap(javain) TYPES "$javainput"
%typemap(in) TYPES %{ $1 = ($1_ltype)(intptr_t)$input; %}
%typemap(out) TYPES %{ $result = (jlong)(intptr_t)$1; %}
%typemap(javaout) TYPES { return $jnicall; }
%enddef

MOE_JAVA_ADDRESS(moe_layer *, const moe_layer *, moe_context *, const moe_context *,
                 const void *x, void *y, const void *dy, void *dx, void *cuda_stream,
                 const float *host, float *host, int64_t *counts, int32_t *expert_ids, float *weights,
                 int32_t *token, int32_t *expert, float *weight)

/* ---- out-parameters: long[] ------------------------------------------------------------------ */
%define MOE_JAVA_OUT(TYPE, NAME, TMPTYPE)
%typemap(jni) TYPE NAME "jlongArray"
%typemap(jtype) TYPE NAME "long[]"
%typemap(jstype) TYPE NAME "long[]"
%typemap(javain) TYPE NAME "$javainput"
%typemap(in) TYPE NAME (TMPTYPE tmp = 0) %{
  if (!moe_java_out_array(jenv, $input, "$1_name")) return $null;
  $1 = &tmp;
%}
%typemap(argout) TYPE NAME %{
  {
    jlong v_ = (jlong)(intptr_t)tmp$argnum;
    (*jenv)->SetLongArrayRegion(jenv, $input, 0, 1, &v_);
  }
%}
%enddef

/* enum out-parameters (moe_layer_param_dtype): int[] of at least one element */
%typemap(jni) moe_dtype *out "jintArray"
%typemap(jtype) moe_dtype *out "int[]"
%typemap(jstype) moe_dtype *out "int[]"
%typemap(javain) moe_dtype *out "$javainput"
%typemap(in) moe_dtype *out (moe_dtype tmp = MOE_DTYPE_F32) %{
  if ($input == NULL || (*jenv)->GetArrayLength(jenv, $input) < 1) {
    SWIG_JavaThrowException(jenv, SWIG_JavaIllegalArgumentException, "out must be an int[] of at least one element");
    return $null;
  }
  $1 = &tmp;
%}
%typemap(argout) moe_dtype *out %{
  {
    jint v_ = (jint)tmp$argnum;
    (*jenv)->SetIntArrayRegion(jenv, $input, 0, 1, &v_);
  }
%}

MOE_JAVA_OUT(moe_layer **, out, moe_layer *)
MOE_JAVA_OUT(moe_context **, out, moe_context *)
MOE_JAVA_OUT(void **, data, void *)
MOE_JAVA_OUT(void **, grad, void *)
MOE_JAVA_OUT(int64_t *, count, int64_t)

/* moe_config_get: a byte[] that receives the NUL-terminated UTF-8 text (MOE_CONFIG_VALUE_MAX bytes
   always suffice). The text goes through a C buffer, so an early return on error leaks nothing. */
%typemap(jni) (char *buf, size_t size) "jbyteArray"
%typemap(jtype) (char *buf, size_t size) "byte[]"
%typemap(jstype) (char *buf, size_t size) "byte[]"
%typemap(javain) (char *buf, size_t size) "$javainput"
%typemap(in) (char *buf, size_t size) (char tmp[MOE_CONFIG_VALUE_MAX]) %{
  if ($input == NULL) {
    SWIG_JavaThrowException(jenv, SWIG_JavaIllegalArgumentException, "buf is null");
    return $null;
  }
  tmp[0] = 0;
  $1 = tmp;
  $2 = (size_t)(*jenv)->GetArrayLength(jenv, $input);
  if ($2 > sizeof tmp) $2 = sizeof tmp;
%}
%typemap(argout) (char *buf, size_t size) %{
  (*jenv)->SetByteArrayRegion(jenv, $input, 0, (jsize)(strlen($1) + 1), (const jbyte *)$1);
%}

/* ---- the address of a direct java.nio buffer ------------------------------------------------- */
%typemap(jni) void *direct_buffer "jobject"
%typemap(jtype) void *direct_buffer "java.nio.Buffer"
%typemap(jstype) void *direct_buffer "java.nio.Buffer"
%typemap(javain) void *direct_buffer "$javainput"
%typemap(in) void *direct_buffer %{
  $1 = $input ? (*jenv)->GetDirectBufferAddress(jenv, $input) : NULL;
  if ($1 == NULL) {
    SWIG_JavaThrowException(jenv, SWIG_JavaIllegalArgumentException, "not a direct buffer");
    return $null;
  }
%}
%inline %{
/* The address of element 0 of a direct buffer (its position is not added). */
int64_t moe_java_buffer_address(void *direct_buffer) { return (int64_t)(intptr_t)direct_buffer; }
%}

/* ---- a direct java.nio.ByteBuffer over native memory (the layer's parameter storage) ---------- */
%typemap(in, numinputs=0) JNIEnv *jenv_ %{ $1 = jenv; %}
%typemap(jni) moe_java_view "jobject"
%typemap(jtype) moe_java_view "java.nio.ByteBuffer"
%typemap(jstype) moe_java_view "java.nio.ByteBuffer"
%typemap(javaout) moe_java_view { return $jnicall; }
%typemap(out) moe_java_view %{ $result = $1; %}
%inline %{
typedef jobject moe_java_view;
/* A direct ByteBuffer of bytes bytes at address, which the caller keeps valid while the buffer
   (or any buffer derived from it) is reachable: org.libmoe.Layer ties the layer's lifetime to it. */
moe_java_view moe_java_direct_buffer(JNIEnv *jenv_, int64_t address, int64_t bytes) {
  if (address == 0 || bytes < 0 || bytes > 0x7fffffff) {
    SWIG_JavaThrowException(jenv_, SWIG_JavaIllegalArgumentException, "moe_java_direct_buffer: bad address or size");
    return NULL;
  }
  return (*jenv_)->NewDirectByteBuffer(jenv_, (void *)(intptr_t)address, (jlong)bytes);
}
%}

/* ---- struct proxies: AutoCloseable, no finalizer --------------------------------------------- */
%typemap(javafinalize) SWIGTYPE ""
%define MOE_JAVA_CLOSEABLE(TYPE)
%typemap(javainterfaces) TYPE "AutoCloseable"
%typemap(javacode) TYPE %{
  /** Frees the C struct (same as delete()). */
  @Override
  public void close() {
    delete();
  }
%}
%enddef
MOE_JAVA_CLOSEABLE(struct moe_config)
MOE_JAVA_CLOSEABLE(struct moe_stats)
MOE_JAVA_CLOSEABLE(struct moe_param_info)
MOE_JAVA_CLOSEABLE(struct moe_config_field_info)
MOE_JAVA_CLOSEABLE(struct moe_comm)

/* ---- expert parallelism: libmoe_mpi, opened at run time ---------------------------------------
 * Java has no MPI binding, so org.libmoe.Comm reaches libmoe_mpi through these helpers. The
 * library is opened with dlopen (RTLD_GLOBAL: Open MPI's own plugins resolve MPI's symbols from
 * the global scope), not linked, so that libmoe_java.so and the libmoe-java package need no MPI;
 * only a program that asks for a comm does. Every moe_mpi_* function used takes no MPI type. */
%{
#include <dlfcn.h>

/* The function `name` of the library opened by moe_java_mpi_open; throws UNSUPPORTED if absent. */
static void *moe_java_mpi_symbol(JNIEnv *jenv, int64_t library, const char *name) {
  void *f = library ? dlsym((void *)(intptr_t)library, name) : NULL;
  if (f == NULL) {
    char msg[512];
    snprintf(msg, sizeof msg, "libmoe_mpi: %s not found (%s)", name, library ? "no such symbol" : "library handle is 0");
    moe_java_throw_text(jenv, MOE_ERR_UNSUPPORTED, msg);
  }
  return f;
}

/* Throws MoeException(s) naming fn and what the status means for it; MOE_OK: nothing. */
static void moe_java_mpi_status(JNIEnv *jenv, moe_status s, const char *fn, const char *detail) {
  char msg[512];
  if (s == MOE_OK) return;
  snprintf(msg, sizeof msg, "%s returned %s%s%s", fn, moe_status_name(s), detail[0] ? ": " : "", detail);
  moe_java_throw_text(jenv, s, msg);
}
%}

%typemap(in, numinputs=0) JNIEnv *jenv_mpi %{ $1 = jenv; %}
%inline %{
/* dlopen(path, RTLD_NOW | RTLD_GLOBAL): the library's handle, never closed (MPI's state lives in
   it until the process ends). Opening it again returns the same handle. */
int64_t moe_java_mpi_open(JNIEnv *jenv_mpi, const char *path) {
  void *h;
  if (path == NULL || !path[0]) {
    moe_java_throw_text(jenv_mpi, MOE_ERR_INVALID_ARGUMENT, "libmoe_mpi: the library path is empty");
    return 0;
  }
  h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (h == NULL) {
    char msg[1024];
    const char *why = dlerror();
    snprintf(msg, sizeof msg, "cannot load libmoe_mpi '%s' (install libmoe-mpi0, or set -Dorg.libmoe.mpi.library): %s", path,
             why ? why : "unknown error");
    moe_java_throw_text(jenv_mpi, MOE_ERR_UNSUPPORTED, msg);
    return 0;
  }
  return (int64_t)(intptr_t)h;
}

void moe_java_mpi_init(JNIEnv *jenv_mpi, int64_t library) {
  moe_status (*f)(void) = (moe_status(*)(void))moe_java_mpi_symbol(jenv_mpi, library, "moe_mpi_init");
  if (f) moe_java_mpi_status(jenv_mpi, f(), "moe_mpi_init", "MPI was finalised, or MPI_Init_thread failed");
}

void moe_java_mpi_finalize(JNIEnv *jenv_mpi, int64_t library) {
  moe_status (*f)(void) = (moe_status(*)(void))moe_java_mpi_symbol(jenv_mpi, library, "moe_mpi_finalize");
  if (f) moe_java_mpi_status(jenv_mpi, f(), "moe_mpi_finalize", "MPI_Finalize failed");
}

/* A comm over MPI_COMM_WORLD (fortran_comm < 0) or over the communicator with that Fortran
   handle: its address. */
int64_t moe_java_mpi_comm_create(JNIEnv *jenv_mpi, int64_t library, int64_t fortran_comm) {
  moe_comm *c = NULL;
  moe_status s;
  const char *detail = "";
  if (fortran_comm < 0) {
    moe_status (*f)(moe_comm **) = (moe_status(*)(moe_comm **))moe_java_mpi_symbol(jenv_mpi, library, "moe_mpi_comm_create_world");
    if (!f) return 0;
    s = f(&c);
    if (s == MOE_ERR_STATE) detail = "MPI is not initialised (Comm.mpiInit) or already finalised";
    if (s == MOE_ERR_INVALID_ARGUMENT) detail = "MOE_MPI_TIMEOUT is not a number of seconds >= 0";
    moe_java_mpi_status(jenv_mpi, s, "moe_mpi_comm_create_world", detail);
  } else {
    moe_status (*f)(int64_t, moe_comm **) =
        (moe_status(*)(int64_t, moe_comm **))moe_java_mpi_symbol(jenv_mpi, library, "moe_mpi_comm_create_f");
    if (!f) return 0;
    s = f(fortran_comm, &c);
    if (s == MOE_ERR_STATE) detail = "MPI is not initialised (Comm.mpiInit) or already finalised";
    if (s == MOE_ERR_INVALID_ARGUMENT) detail = "a Fortran handle outside MPI_Fint, MPI_COMM_NULL, or a bad MOE_MPI_TIMEOUT";
    moe_java_mpi_status(jenv_mpi, s, "moe_mpi_comm_create_f", detail);
  }
  return s == MOE_OK ? (int64_t)(intptr_t)c : 0;
}

void moe_java_mpi_comm_destroy(JNIEnv *jenv_mpi, int64_t library, int64_t comm) {
  void (*f)(moe_comm *) = (void (*)(moe_comm *))moe_java_mpi_symbol(jenv_mpi, library, "moe_mpi_comm_destroy");
  if (f) f((moe_comm *)(intptr_t)comm);
}

void moe_java_mpi_comm_set_timeout(JNIEnv *jenv_mpi, int64_t library, int64_t comm, double seconds) {
  moe_status (*f)(moe_comm *, double) =
      (moe_status(*)(moe_comm *, double))moe_java_mpi_symbol(jenv_mpi, library, "moe_mpi_comm_set_timeout");
  if (f) moe_java_mpi_status(jenv_mpi, f((moe_comm *)(intptr_t)comm, seconds), "moe_mpi_comm_set_timeout",
                             "seconds must be > 0, or 0 or infinity for no deadline");
}

int moe_java_comm_size(int64_t comm) { return comm ? ((const moe_comm *)(intptr_t)comm)->size : 0; }
int moe_java_comm_rank(int64_t comm) { return comm ? ((const moe_comm *)(intptr_t)comm)->rank : 0; }

/* Make cfg's layer spread its experts over comm (an address; 0: none). */
void moe_java_config_set_comm(moe_config *cfg, int64_t comm) {
  if (cfg) cfg->comm = (const moe_comm *)(intptr_t)comm;
}

/* Sum n floats at host over the comm's ranks, in place, through the comm's own all-to-all of rows:
   each rank sends its n values to every rank and adds what it receives in rank order, so every
   rank gets the same bits. Collective: every rank calls it with the same n. */
void moe_java_comm_all_reduce_sum(JNIEnv *jenv_mpi, int64_t comm, float *host, int64_t n) {
  const moe_comm *c = (const moe_comm *)(intptr_t)comm;
  int64_t *counts;
  float *send, *recv;
  moe_status s;
  int q;
  int64_t i;
  if (c == NULL || host == NULL || n <= 0) {
    moe_java_throw_text(jenv_mpi, MOE_ERR_INVALID_ARGUMENT, "allReduceSum: no comm, no data or n <= 0");
    return;
  }
  counts = (int64_t *)malloc(sizeof(int64_t) * (size_t)c->size);
  send = (float *)malloc(sizeof(float) * (size_t)n * (size_t)c->size);
  recv = (float *)malloc(sizeof(float) * (size_t)n * (size_t)c->size);
  if (counts == NULL || send == NULL || recv == NULL) {
    free(counts), free(send), free(recv);
    moe_java_throw_text(jenv_mpi, MOE_ERR_OUT_OF_MEMORY, "allReduceSum: no memory for the exchange");
    return;
  }
  for (q = 0; q < c->size; ++q) {
    counts[q] = 1;
    memcpy(send + (size_t)q * (size_t)n, host, sizeof(float) * (size_t)n);
  }
  s = c->exchange_rows(c->user, send, counts, recv, counts, sizeof(float) * (size_t)n, NULL);
  if (s == MOE_OK) {
    for (i = 0; i < n; ++i) {
      float sum = 0.0f;
      for (q = 0; q < c->size; ++q) sum += recv[(size_t)q * (size_t)n + (size_t)i];
      host[i] = sum;
    }
  } else {
    char msg[1024];
    snprintf(msg, sizeof msg, "allReduceSum: the comm's exchange_rows returned %s: %s", moe_status_name(s),
             c->last_error ? c->last_error(c->user) : "");
    moe_java_throw_text(jenv_mpi, s, msg);
  }
  free(counts), free(send), free(recv);
}
%}
