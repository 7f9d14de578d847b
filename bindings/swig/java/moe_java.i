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

/* Throw org.libmoe.MoeException(code, name, messageUtf8) for status s with this thread's
   moe_last_error(). The message goes as UTF-8 bytes (NewStringUTF expects modified UTF-8). */
static void moe_java_throw(JNIEnv *jenv, moe_status s) {
  const char *name = moe_status_name(s);
  const char *text = moe_last_error();
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
