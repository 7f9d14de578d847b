package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Set;
import java.util.TreeSet;
import org.junit.jupiter.api.Test;

/**
 * Where the native libraries come from. ctest runs these with the standalone jar (natives inside)
 * and again with the packaged jar (none inside: java.library.path and the system's libmoe), and
 * tests/packaging with the installed jar; the expectation comes in system properties:
 *   org.libmoe.test.expectSource   the start of NativeLoader.source() (default "jar:")
 *   org.libmoe.test.expectLibmoe   the start of the path of the libmoe.so.0 in use
 */
class LoaderTest {
  static final String EXPECT_SOURCE = "org.libmoe.test.expectSource";
  static final String EXPECT_LIBMOE = "org.libmoe.test.expectLibmoe";

  private static boolean packaged() {
    return "java.library.path".equals(System.getProperty(EXPECT_SOURCE));
  }

  @Test
  void theNativeLibraryComesFromWhereItShould() {
    String source = Moe.nativeSource();
    assertNotNull(source);
    if (System.getProperty(NativeLoader.PATH_PROPERTY) != null) return;
    String expect = System.getProperty(EXPECT_SOURCE, "jar:/org/libmoe/native/");
    assertTrue(source.startsWith(expect), "loaded from " + source + ", expected " + expect);
  }

  @Test
  void onlyTheStandaloneJarCarriesNativeLibraries() {
    String dir = NativeLoader.resourceDir();
    boolean hasJni = NativeLoader.class.getResource(dir + NativeLoader.JNI_FILE) != null;
    boolean hasLibmoe = NativeLoader.class.getResource(dir + NativeLoader.LIBMOE_FILE) != null;
    if (packaged()) {
      assertFalse(hasJni, "the packaged jar carries " + dir + NativeLoader.JNI_FILE);
      assertFalse(hasLibmoe, "the packaged jar carries " + dir + NativeLoader.LIBMOE_FILE);
    } else if (System.getProperty(NativeLoader.PATH_PROPERTY) == null) {
      assertTrue(hasJni && hasLibmoe, "the standalone jar lacks its native libraries under " + dir);
    }
  }

  @Test
  void exactlyOneLibmoeIsLoadedAndItIsTheExpectedOne() throws IOException {
    Moe.version(); // loads the libraries
    Set<String> libs = new TreeSet<>();
    for (String line : Files.readAllLines(Path.of("/proc/self/maps"))) {
      int slash = line.indexOf('/');
      if (slash < 0) continue;
      String path = line.substring(slash);
      String file = path.substring(path.lastIndexOf('/') + 1);
      if (file.startsWith("libmoe.so.")) libs.add(path);
    }
    assertEquals(1, libs.size(), "libmoe libraries mapped: " + libs);
    String expect = System.getProperty(EXPECT_LIBMOE);
    if (expect != null) {
      String lib = libs.iterator().next();
      assertTrue(lib.startsWith(expect), "libmoe in use: " + lib + ", expected under " + expect);
    }
  }

  @Test
  void versionOfTheLoadedLibrary() {
    assertEquals(Moe.HEADER_VERSION, Moe.version());
    assertTrue(Moe.versionString().matches("\\d+\\.\\d+\\.\\d+"), Moe.versionString());
    // (the manifest of the jar Moe came from: the package org.libmoe spans the tests' jar too)
    try (java.util.jar.JarFile jar =
        new java.util.jar.JarFile(Path.of(Moe.class.getProtectionDomain().getCodeSource().getLocation().toURI()).toFile())) {
      assertEquals(Moe.versionString(), jar.getManifest().getMainAttributes().getValue("Implementation-Version"),
          "the jar's manifest names the version of the library it was built with");
    } catch (IOException | java.net.URISyntaxException e) {
      fail(e);
    }
  }
}
