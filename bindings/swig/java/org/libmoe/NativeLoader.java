package org.libmoe;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.net.URL;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.util.Locale;

/**
 * Loads the JNI library {@code libmoe_java.so} (and the libmoe it needs) once per class loader.
 * Called by the static initializer of the generated JNI class, so users never call it themselves.
 *
 * <p>Where it looks, in order:
 *
 * <ol>
 *   <li>the system property {@code org.libmoe.native.path}: the JNI library file, or a directory
 *       holding {@code libmoe_java.so} (and optionally {@code libmoe.so.0}, loaded first);
 *   <li>the standalone jar only: {@code /org/libmoe/native/<os>-<arch>/} (e.g.
 *       {@code linux-x86_64}) holds {@code libmoe_java.so} and {@code libmoe.so.0}; they are
 *       copied to a private temporary directory, loaded (libmoe first) and deleted again;
 *   <li>{@code System.loadLibrary("moe_java")}: {@code java.library.path} (Debian installs JNI
 *       libraries in /usr/lib/&lt;triplet&gt;/jni), libmoe found by the dynamic linker. This is how
 *       the packaged jar (libmoe-java), which carries no native library, uses the system's.
 * </ol>
 *
 * The native libraries of the standalone jar are preferred to those on java.library.path because
 * they were built together with the jar's classes. {@link #source()} tells which one was loaded.
 */
public final class NativeLoader {
  /** System property naming the JNI library file or its directory. */
  public static final String PATH_PROPERTY = "org.libmoe.native.path";

  static final String JNI_NAME = "moe_java";
  static final String JNI_FILE = System.mapLibraryName(JNI_NAME);
  static final String LIBMOE_FILE = "libmoe.so.0";

  private static String source;

  private NativeLoader() {}

  /** Loads the native libraries unless already done; throws UnsatisfiedLinkError when none is found. */
  public static synchronized void load() {
    if (source != null) return;
    StringBuilder tried = new StringBuilder();
    String explicit = System.getProperty(PATH_PROPERTY);
    if (explicit != null && !explicit.isEmpty()) {
      source = loadFromPath(Paths.get(explicit));
      return;
    }
    try {
      String s = loadFromJar();
      if (s != null) {
        source = s;
        return;
      }
      tried.append("no native library in the jar under ").append(resourceDir());
    } catch (IOException | UnsatisfiedLinkError e) {
      tried.append("the jar's native library: ").append(e.getMessage());
    }
    try {
      System.loadLibrary(JNI_NAME);
      source = "java.library.path";
    } catch (UnsatisfiedLinkError e) {
      UnsatisfiedLinkError err =
          new UnsatisfiedLinkError(
              "libmoe: cannot load the JNI library "
                  + JNI_FILE
                  + " ("
                  + tried
                  + "; java.library.path: "
                  + e.getMessage()
                  + "). Set -D"
                  + PATH_PROPERTY
                  + "=<file or directory> or -Djava.library.path.");
      err.initCause(e);
      throw err;
    }
  }

  /** Where the JNI library came from: a path, {@code "jar:<resource>"} or "java.library.path"; null before loading. */
  public static synchronized String source() {
    return source;
  }

  /** The jar's resource folder for this platform, e.g. /org/libmoe/native/linux-x86_64/. */
  static String resourceDir() {
    String os = System.getProperty("os.name", "").toLowerCase(Locale.ROOT);
    String arch = System.getProperty("os.arch", "").toLowerCase(Locale.ROOT);
    if (os.startsWith("linux")) os = "linux";
    else if (os.startsWith("mac") || os.startsWith("darwin")) os = "macos";
    else if (os.startsWith("windows")) os = "windows";
    if (arch.equals("amd64") || arch.equals("x86-64")) arch = "x86_64";
    else if (arch.equals("arm64")) arch = "aarch64";
    return "/org/libmoe/native/" + os + "-" + arch + "/";
  }

  private static String loadFromPath(Path p) {
    Path jni = Files.isDirectory(p) ? p.resolve(JNI_FILE) : p;
    Path dir = jni.toAbsolutePath().getParent();
    if (dir != null && Files.isRegularFile(dir.resolve(LIBMOE_FILE))) {
      System.load(dir.resolve(LIBMOE_FILE).toAbsolutePath().toString());
    }
    System.load(jni.toAbsolutePath().toString());
    return jni.toAbsolutePath().toString();
  }

  /** Extracts and loads the jar's libraries; null when the jar has none for this platform. */
  private static String loadFromJar() throws IOException {
    String dir = resourceDir();
    URL jni = NativeLoader.class.getResource(dir + JNI_FILE);
    if (jni == null) return null;
    Path tmp = Files.createTempDirectory("libmoe-jni-");
    try {
      // libmoe first: the JNI library's dependency on libmoe.so.0 (its SONAME) then resolves to it.
      Path libmoe = extract(dir + LIBMOE_FILE, tmp.resolve(LIBMOE_FILE));
      if (libmoe != null) System.load(libmoe.toString());
      Path glue = extract(dir + JNI_FILE, tmp.resolve(JNI_FILE));
      System.load(glue.toString());
      return "jar:" + dir + JNI_FILE;
    } finally {
      // Loaded libraries stay mapped after their files are removed (Linux, macOS).
      deleteQuietly(tmp.resolve(JNI_FILE));
      deleteQuietly(tmp.resolve(LIBMOE_FILE));
      deleteQuietly(tmp);
    }
  }

  private static Path extract(String resource, Path to) throws IOException {
    try (InputStream in = NativeLoader.class.getResourceAsStream(resource)) {
      if (in == null) return null;
      Files.copy(in, to, StandardCopyOption.REPLACE_EXISTING);
      return to;
    }
  }

  private static void deleteQuietly(Path p) {
    try {
      Files.deleteIfExists(p);
    } catch (IOException | UncheckedIOException e) {
      // a leftover file in the temporary directory is harmless
    }
  }
}
