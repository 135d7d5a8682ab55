package podiam;

import java.time.Duration;
import java.time.Instant;
import software.amazon.awssdk.auth.credentials.AwsCredentials;
import software.amazon.awssdk.auth.credentials.AwsSessionCredentials;
import software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider;
import software.amazon.awssdk.services.sts.StsClient;

/**
 * whoami: the AWS SDK for Java 2.x default credential chain, then STS GetCallerIdentity, as an
 * enterprise service in a pod would do it. podiam's SDK matrix runs it inside pods.
 *
 * <p>Usage: WhoAmI [seconds]. With seconds &gt; 0 it calls GetCallerIdentity once a second for
 * that long, so the SDK's credential cache has to refresh through the metadata service. Each call
 * prints one JSON line; any failed call makes the exit code 1.
 */
public final class WhoAmI {
  public static void main(String[] args) throws InterruptedException {
    long seconds = args.length > 0 ? Long.parseLong(args[0]) : 0;
    // What StsClient.create() uses when given nothing; held so each line can show the key the
    // call signed with (the provider caches, so this is the same answer, not a second lookup).
    DefaultCredentialsProvider chain = DefaultCredentialsProvider.builder().build();
    boolean failed = false;
    try (StsClient sts = StsClient.builder().credentialsProvider(chain).build()) {
      Instant deadline = Instant.now().plusSeconds(seconds);
      while (true) {
        String line = once(chain, sts);
        failed |= line.contains("\"error\"");
        System.out.println(line);
        if (!Instant.now().isBefore(deadline)) {
          break;
        }
        Thread.sleep(Duration.ofSeconds(1).toMillis());
      }
    } catch (RuntimeException error) {
      System.out.println("{\"error\":" + quote(error.toString()) + "}");
      failed = true;
    }
    System.exit(failed ? 1 : 0);
  }

  private static String once(DefaultCredentialsProvider chain, StsClient sts) {
    StringBuilder line = new StringBuilder("{");
    try {
      AwsCredentials creds = chain.resolveCredentials();
      String key = creds.accessKeyId();
      line.append("\"access_key_id\":").append(quote(key));
      line.append(",\"access_key_id_prefix\":").append(quote(key.substring(0, Math.min(4, key.length()))));
      creds.expirationTime().ifPresent(t -> line.append(",\"expiration\":").append(quote(t.toString())));
      if (!(creds instanceof AwsSessionCredentials)) {
        line.append(",\"note\":\"not session credentials\"");
      }
      String arn = sts.getCallerIdentity().arn();
      line.append(",\"arn\":").append(quote(arn));
    } catch (RuntimeException error) {
      if (line.length() > 1) {
        line.append(",");
      }
      line.append("\"error\":").append(quote(error.toString()));
    }
    return line.append("}").toString();
  }

  private static String quote(String s) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    return out.append('"').toString();
  }
}
