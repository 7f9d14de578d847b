package org.libmoe;

import java.nio.charset.StandardCharsets;

/**
 * Every failure of this binding: a libmoe call that returned a status other than MOE_OK (with the
 * library's message from moe_last_error(), naming the offending argument), or an argument this
 * binding refused before calling libmoe (wrong buffer size, a closed layer, ...).
 *
 * <p>Unchecked, like {@link IllegalArgumentException}. A failed call changes nothing: the layer and
 * its contexts stay usable.
 */
public class MoeException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  private final Status status;
  private final int code;
  private final String statusName;
  private final String libraryMessage;

  /** A failure detected by this binding. */
  public MoeException(Status status, String message) {
    super(status.statusName() + ": " + message);
    this.status = status;
    this.code = status.code();
    this.statusName = status.statusName();
    this.libraryMessage = message;
  }

  /** Thrown from the JNI wrapper: status code, its name, and moe_last_error() as UTF-8 bytes. */
  MoeException(int code, String statusName, byte[] messageUtf8) {
    this(code, statusName, new String(messageUtf8, StandardCharsets.UTF_8));
  }

  private MoeException(int code, String statusName, String message) {
    super(message.isEmpty() ? statusName : statusName + ": " + message);
    this.status = Status.fromCode(code);
    this.code = code;
    this.statusName = statusName;
    this.libraryMessage = message;
  }

  /** Which kind of failure. */
  public Status getStatus() {
    return status;
  }

  /** The C status value (meaningful also when {@link #getStatus()} is UNKNOWN). */
  public int getStatusCode() {
    return code;
  }

  /** The status name, e.g. {@code "MOE_ERR_INVALID_ARGUMENT"}. */
  public String getStatusName() {
    return statusName;
  }

  /** The library's message without the status name (or this binding's, for its own checks). */
  public String getLibraryMessage() {
    return libraryMessage;
  }
}
