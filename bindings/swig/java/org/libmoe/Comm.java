package org.libmoe;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import org.libmoe.jni.MoeNative;

/**
 * An expert-parallel communicator ({@code moe_comm}) over MPI, made by libmoe_mpi: a layer created
 * with one ({@link Layer#Layer(Config, Comm)}) holds {@code numExperts / size()} of the experts
 * (rank order) and exchanges tokens with the other ranks inside every forward and backward.
 *
 * <pre>{@code
 * Comm.mpiInit();                                  // or MPI_Init by another library in the process
 * try (Comm comm = Comm.mpiWorld();                // every rank of the job (mpirun -np R java ...)
 *      Layer layer = new Layer(cfg, comm); Context ctx = layer.newContext()) {
 *   ctx.forward(myTokens, y);                      // this rank's share of the batch
 *   ctx.backward(dy, dx);
 *   float[] g = layer.getGrad("router.weight");    // this rank's share: sum it over the ranks
 *   comm.allReduceSum(g);
 * }
 * Comm.mpiFinalize();
 * }</pre>
 *
 * <p>Java has no MPI binding: libmoe_mpi is loaded at run time from the path in the system property
 * {@code org.libmoe.mpi.library} (default {@code libmoe_mpi.so.0}, found on the dynamic linker's
 * path; Debian package libmoe-mpi0), so that programs without expert parallelism need no MPI. A
 * communicator made by another MPI binding in the same process is passed by its Fortran handle
 * ({@link #mpiFromFortran(long)}). The deadline of every exchange (default 300 s, environment
 * variable {@code MOE_MPI_TIMEOUT}, {@link #setTimeout(double)}) and what a failed exchange leaves
 * behind are described in moe_mpi.h.
 *
 * <p>Creating and closing a comm are collective over its ranks. Close every layer made with a comm
 * before the comm: {@link #close()} refuses (STATE) while one is open.
 */
public final class Comm implements AutoCloseable {
  /** The system property naming libmoe_mpi's file. */
  public static final String LIBRARY_PROPERTY = "org.libmoe.mpi.library";

  private static long library;

  /** libmoe_mpi's handle, opened on first use (a failure throws, and the next call tries again). */
  private static synchronized long library() {
    if (library == 0) library = MoeNative.moe_java_mpi_open(System.getProperty(LIBRARY_PROPERTY, "libmoe_mpi.so.0"));
    return library;
  }

  private long handle;
  private final int size;
  private final int rank;
  private int layers;

  private Comm(long handle) {
    this.handle = handle;
    this.size = MoeNative.moe_java_comm_size(handle);
    this.rank = MoeNative.moe_java_comm_rank(handle);
  }

  /**
   * Initialises MPI (MPI_Init_thread, MPI_THREAD_SERIALIZED) unless it already is.
   *
   * @throws MoeException UNSUPPORTED (libmoe_mpi cannot be loaded), STATE (MPI was finalised),
   *     COMM
   */
  public static void mpiInit() {
    MoeNative.moe_java_mpi_init(library());
  }

  /** Finalises MPI if it is initialised and not finalised; close every comm first. */
  public static void mpiFinalize() {
    MoeNative.moe_java_mpi_finalize(library());
  }

  /**
   * A comm over every rank of the job (MPI_COMM_WORLD). Collective.
   *
   * @throws MoeException STATE (MPI not initialised: {@link #mpiInit()}), INVALID_ARGUMENT (a bad
   *     MOE_MPI_TIMEOUT), COMM, UNSUPPORTED (libmoe_mpi cannot be loaded)
   */
  public static Comm mpiWorld() {
    return new Comm(MoeNative.moe_java_mpi_comm_create(library(), -1));
  }

  /**
   * A comm over the MPI communicator with this Fortran handle ({@code MPI_Comm_c2f}, mpi4py's
   * {@code comm.py2f()}). Collective over that communicator.
   *
   * @throws MoeException INVALID_ARGUMENT (a negative handle, one outside MPI_Fint), as {@link
   *     #mpiWorld()} otherwise
   */
  public static Comm mpiFromFortran(long fortranHandle) {
    if (fortranHandle < 0)
      throw new MoeException(Status.INVALID_ARGUMENT, "fortranHandle = " + fortranHandle + ": a Fortran handle is >= 0");
    return new Comm(MoeNative.moe_java_mpi_comm_create(library(), fortranHandle));
  }

  /** The number of ranks R. */
  public int size() {
    return size;
  }

  /** This process's rank, 0 &lt;= rank &lt; R; it holds experts [rank·E/R, (rank+1)·E/R). */
  public int rank() {
    return rank;
  }

  /**
   * How long each exchange waits for the other ranks: seconds &gt; 0, or 0 or infinity for no
   * deadline. Local; from the next exchange on.
   *
   * @throws MoeException INVALID_ARGUMENT for a negative or NaN value, STATE once closed
   */
  public synchronized void setTimeout(double seconds) {
    MoeNative.moe_java_mpi_comm_set_timeout(library(), live(), seconds);
  }

  /**
   * Sums {@code values} over the ranks, in place, through the comm's own all-to-all (no MPI binding
   * needed): e.g. the gradients of the replicated parameters (router, shared experts), of which each
   * rank holds its tokens' share. Every rank gets the same bits. Collective: every rank calls it
   * with the same length, between the same layer calls.
   *
   * @throws MoeException COMM (the exchange failed or passed its deadline), STATE once closed
   */
  public synchronized void allReduceSum(float[] values) {
    if (values == null) throw new MoeException(Status.INVALID_ARGUMENT, "values is null");
    if (values.length == 0) return;
    FloatBuffer buf = ByteBuffer.allocateDirect(4 * values.length).order(ByteOrder.nativeOrder()).asFloatBuffer();
    buf.put(values);
    MoeNative.moe_java_comm_all_reduce_sum(live(), MoeNative.moe_java_buffer_address(buf), values.length);
    buf.rewind();
    buf.get(values);
  }

  /** The {@code moe_comm *} address (0 once closed), for the C API through other means. */
  public synchronized long handle() {
    return handle;
  }

  synchronized long live() {
    if (handle == 0) throw new MoeException(Status.STATE, "the comm is closed");
    return handle;
  }

  synchronized long attach() {
    long h = live();
    layers++;
    return h;
  }

  synchronized void detach() {
    layers--;
  }

  /**
   * Frees the comm (moe_mpi_comm_destroy; collective). Calling it again does nothing.
   *
   * @throws MoeException STATE while a layer made with this comm is open
   */
  @Override
  public synchronized void close() {
    if (handle == 0) return;
    if (layers > 0)
      throw new MoeException(Status.STATE, layers + " layer(s) made with this comm are still open: close them first");
    MoeNative.moe_java_mpi_comm_destroy(library(), handle);
    handle = 0;
  }
}
